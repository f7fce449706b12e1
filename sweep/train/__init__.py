"""Pure training pieces shared by pretraining and baselines (no Ray): augmentation, DDPM loss, sampling."""
