"""`sweep baselines`: supervised and self-supervised baseline encoders (issue 6, not built yet)."""

from __future__ import annotations

from sweep.config import PipelineConfig


def run(config: PipelineConfig) -> None:
    if not config.baselines:
        from sweep.stages.common import say

        say("baselines: none configured")
        return
    raise NotImplementedError(
        "baselines: training baseline encoders is not implemented yet; remove `baselines:` from the pipeline "
        "(or run `sweep run --stages pretrain,extract,probe,report`)"
    )
