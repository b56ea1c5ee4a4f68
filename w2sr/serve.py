"""`w2sr serve`: models of a run behind one OpenAI-compatible API (Ray Serve LLM on vLLM).

Each hosted model is one `LLMConfig` whose model id is its label (`w2sr`, `w2sr_p`, `base`, an
`eval.models` extra, ...), so `/v1/models` lists the labels and `w2sr eval --endpoint URL` finds
the same models it would evaluate offline. Engines use the same settings as the offline stages
(`engines.engine_kwargs`, `engine_env`, `engine_bundle`), from `serve.engine`.

Replicas follow `serve.engine.replicas`: a fixed pool when min == max, else Serve's autoscaler
keeps each replica near `target_ongoing_requests`. Serve's HTTP proxy does no authentication (Ray's
token auth covers the cluster's own APIs, not the proxy), hence the default host 127.0.0.1.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from w2sr import engines
from w2sr.config import ExperimentConfig
from w2sr.evaluate import STUDENTS, Model, model_table
from w2sr.models import resolve_model

log = logging.getLogger(__name__)

DEFAULT_LABELS = (*STUDENTS, "rl")  # the trained students, when nothing else is asked for


def hosted_models(cfg: ExperimentConfig) -> list[Model]:
    """The models `serve.models` names (default: every trained student present), checked before
    any Ray work starts."""
    models, skipped = model_table(cfg)
    wanted = cfg.serve.models or [label for label in DEFAULT_LABELS if label in models]
    if not wanted:
        raise ValueError(
            f"serve.models: no trained student in {cfg.run_dir} ({skipped}); "
            "name the models to host, e.g. serve.models=[base]"
        )
    unknown = [label for label in wanted if label not in models]
    if unknown:
        reasons = {label: skipped.get(label, "not a label of this run") for label in unknown}
        raise ValueError(f"serve.models: cannot host {reasons}; present: {sorted(models)}")
    return [models[label] for label in wanted]


def llm_config(cfg: ExperimentConfig, model: Model):
    """One model's Serve LLM deployment, with the engine settings of the offline stages."""
    from ray.serve.llm import LLMConfig

    engine, sv = cfg.serve.engine, cfg.serve
    source = resolve_model(model.spec) if "://" not in model.spec else model.spec
    return LLMConfig(
        model_loading_config={"model_id": model.label, "model_source": source},
        engine_kwargs=engines.engine_kwargs(
            engine, use_gpu=cfg.use_gpu, trust_remote_code=cfg.trust_remote_code
        ),
        runtime_env=engines.engine_env(engine, cfg.use_gpu),
        placement_group_config={"bundle_per_worker": engines.engine_bundle(engine, cfg.use_gpu)},
        accelerator_type=engine.accelerator_type,
        deployment_config={
            "autoscaling_config": {
                "min_replicas": engine.replicas.min,
                "max_replicas": engine.replicas.max,
                "target_ongoing_requests": sv.target_ongoing_requests,
            },
            "max_ongoing_requests": sv.max_ongoing_requests,
        },
    )


def serve(cfg: ExperimentConfig, blocking: bool = True) -> dict[str, Any]:
    """Deploy the app and return where it answers; with `blocking`, keep it up until Ctrl-C and
    then delete it (a non-blocking call leaves it running in the cluster)."""
    from ray import serve as ray_serve
    from ray.serve.llm import build_openai_app

    models = hosted_models(cfg)
    engines.init_ray(cfg)
    sv = cfg.serve
    # HTTP options are cluster-wide and fixed once Serve runs; a second app reuses the first's.
    ray_serve.start(http_options={"host": sv.host, "port": sv.port})
    app = build_openai_app({"llm_configs": [llm_config(cfg, m) for m in models]})
    ray_serve.run(app, name=sv.app_name, route_prefix="/")
    info = {
        "url": f"http://{sv.host}:{sv.port}/v1",
        "app": sv.app_name,
        "models": {m.label: m.spec for m in models},
    }
    log.info("serving %s at %s", sorted(info["models"]), info["url"])
    if blocking:
        try:
            while True:
                time.sleep(60)
        except KeyboardInterrupt:
            log.info("deleting Serve app %s", sv.app_name)
            ray_serve.delete(sv.app_name)
    return info
