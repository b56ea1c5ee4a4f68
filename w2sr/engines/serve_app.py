"""The Ray Serve LLM app: each hosted model is one `LLMConfig` whose model id is its label, with
the engine settings of the offline stages (`w2sr.engines.settings`) from `serve.engine`.

Replicas follow `serve.engine.replicas`: a fixed pool when min == max, else Serve's autoscaler
keeps each replica near `target_ongoing_requests`. Requests past a model's queue bound are
answered 503 at once. Serve's HTTP proxy authenticates nobody, so when an API key is set (the
variable `serve.api_key_env`) the app itself answers 401 to every request without it; the app
holds only the key's hash.

A model in object storage is copied to each node under a name made from its URI, whose
fingerprinted folder names its content: Serve LLM's own download names the copy by the served
label, so two students served under one label on a node would share a folder and mix files.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from typing import cast

from ray.llm._internal.common.callbacks.base import CallbackBase, CallbackConfig

from w2sr.config import ExperimentConfig
from w2sr.engines import settings
from w2sr.models import ModelSpec
from w2sr.registry import Model
from w2sr.rundir import RunDir

# The ingress of an app behind an API key, by this deployment name: how `w2sr serve` tells a
# running keyed app from a keyless one.
KEYED_INGRESS = "KeyedOpenAiIngress"


def llm_config(cfg: ExperimentConfig, model: Model):
    """One model's Serve LLM deployment."""
    from ray.serve.llm import LLMConfig

    engine, sv = cfg.serve.engine, cfg.serve
    source = ModelSpec.parse(model.spec).for_cluster(RunDir(cfg.run_dir))
    in_store = ModelSpec.parse(source).kind == "store"
    return LLMConfig(
        model_loading_config={"model_id": model.label, "model_source": source},
        callback_config=CallbackConfig(NodeCopy, {"uri": source}) if in_store else CallbackConfig(),
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


class NodeCopy(CallbackBase):
    """Serve LLM's start-up hooks for a model in object storage (`uri`): the engine loads the
    node copy that `ModelSpec.local` makes, named by the URI, and Serve LLM downloads nothing
    under the label."""

    async def on_before_node_init(self) -> None:
        engine = self.llm_config.get_engine_config()
        assert engine is not None  # built on first use, never None
        uri = ModelSpec.parse(self.kwargs["uri"])
        engine.hf_model_id = await asyncio.to_thread(uri.local)
        engine.mirror_config = None

    def on_before_download_model_files_distributed(self) -> None:
        ModelSpec.parse(
            self.kwargs["uri"]
        ).local()  # on every node of the replica's placement group


def openai_app(cfg: ExperimentConfig, models: list[Model]):
    """The OpenAI-compatible app (`/v1/models`, `/v1/chat/completions`) over `models`."""
    key = os.environ.get(cfg.serve.api_key_env)
    return keyed_openai_app([llm_config(cfg, m) for m in models], key)


class BearerKey:
    """ASGI middleware: an HTTP request gets through only with `Authorization: Bearer <key>`."""

    def __init__(self, app, key_sha256: str):
        self.app, self.key_sha256 = app, key_sha256

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            digest = hashlib.sha256(given).hexdigest()
            if scheme.lower() != b"bearer" or not hmac.compare_digest(digest, self.key_sha256):
                from starlette.responses import JSONResponse

                error = {"message": "a valid API key is required", "type": "unauthorized"}
                await JSONResponse({"error": error}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def keyed_openai_app(llm_configs: list, key: str | None):
    """Serve LLM's OpenAI app, behind `key` when one is given.

    Serve LLM offers no hook for middleware, so with a key this assembles the app as its
    `build_openai_app` does (ray 2.60, the version w2sr pins), on an ingress whose FastAPI app
    checks the key first.
    """
    from ray.serve.llm import build_openai_app

    if not key:
        return build_openai_app({"llm_configs": llm_configs})
    from ray import serve
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.builder import LLMServingArgs
    from ray.llm._internal.serve.core.ingress.ingress import (
        OpenAiIngress,
        init,
        make_fastapi_ingress,
    )
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment

    # The field's validator makes every entry an LLMConfig; its annotation keeps the inputs'.
    configs = cast(
        list[LLMConfig], LLMServingArgs.model_validate({"llm_configs": llm_configs}).llm_configs
    )
    fastapi_app = init()
    fastapi_app.add_middleware(BearerKey, key_sha256=hashlib.sha256(key.encode()).hexdigest())
    ingress = make_fastapi_ingress(OpenAiIngress, app=fastapi_app)
    options = maybe_apply_llm_deployment_config_defaults(
        OpenAiIngress.get_deployment_options(configs), {}
    )
    # Given the class, serve.deployment returns the Deployment; ray annotates the decorator only.
    return serve.deployment(ingress, name=KEYED_INGRESS, **options).bind(  # type: ignore[attr-defined]
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        lora_paths={},
    )
