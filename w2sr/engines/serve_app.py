"""The Ray Serve LLM app: each hosted model is one `LLMConfig` whose model id is its label, with
the engine settings of the offline stages (`w2sr.engines.settings`) from `serve.engine`.

Replicas follow `serve.engine.replicas`: a fixed pool when min == max, else Serve's autoscaler
keeps each replica near `target_ongoing_requests`.
"""

from __future__ import annotations

from w2sr.config import ExperimentConfig
from w2sr.engines import settings
from w2sr.registry import Model, model_path


def llm_config(cfg: ExperimentConfig, model: Model):
    """One model's Serve LLM deployment."""
    from ray.serve.llm import LLMConfig

    engine, sv = cfg.serve.engine, cfg.serve
    return LLMConfig(
        model_loading_config={"model_id": model.label, "model_source": model_path(model)},
        engine_kwargs=settings.engine_kwargs(
            engine, use_gpu=cfg.use_gpu, trust_remote_code=cfg.trust_remote_code
        ),
        runtime_env=settings.engine_env(engine, cfg.use_gpu),
        placement_group_config={"bundle_per_worker": settings.engine_bundle(engine, cfg.use_gpu)},
        accelerator_type=engine.accelerator_type,
        deployment_config={
            "autoscaling_config": {
                "min_replicas": engine.replicas.min,
                "max_replicas": engine.replicas.max,
                "target_ongoing_requests": sv.target_ongoing_requests,
            },
            "max_ongoing_requests": sv.max_ongoing_requests,
            "max_queued_requests": sv.max_queued_requests,
        },
    )


def openai_app(cfg: ExperimentConfig, models: list[Model]):
    """The OpenAI-compatible app (`/v1/models`, `/v1/chat/completions`) over `models`."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [llm_config(cfg, m) for m in models]})
