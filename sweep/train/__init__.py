"""Pure training pieces shared by pretraining and baselines (no Ray): augmentation, the DDPM loss and a sampler,
and the resumable DDPM training step (`loop.DDPMTrainer`) that the Ray Train stage and the plain-DDP benchmark
both run."""
