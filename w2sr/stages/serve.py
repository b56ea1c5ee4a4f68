"""Stage `serve`: models of a run behind one OpenAI-compatible API (Ray Serve LLM on vLLM).

    w2sr serve CONFIG [--detach]

Each model is served under its label (`w2sr`, `w2sr_p`, `base`, an `eval.models` extra, ...), so
`/v1/models` lists the labels and `w2sr eval --endpoint URL` finds the same models it would
evaluate offline. Serve's HTTP proxy does no authentication (Ray's token auth covers the
cluster's own APIs, not the proxy), hence the default host 127.0.0.1; any other host needs an
API key (`serve.api_key_env`), which the app checks on every request. Serve's HTTP options are
the cluster's, fixed while it runs, so a serve that would not get its own, or a keyless app that
would join a keyed one, is refused.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig, ServeConfig, load_config
from w2sr.engines.serve_app import KEYED_INGRESS, openai_app
from w2sr.registry import Model, model_table
from w2sr.session import init_ray

log = logging.getLogger(__name__)

DEFAULT_LABELS = (*layout.STUDENT_LABELS, "rl")  # the trained students, when nothing is asked for


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


def check_running_serve(sv: ServeConfig, keyed: bool) -> None:
    """Refuse to deploy into a Serve instance already running on the cluster where the app
    would not be what was asked for: Serve keeps the HTTP options it started with and ignores
    new ones (an app asking for loopback would answer wherever that instance listens), and a
    keyless app would replace or join a keyed one on the same proxy."""
    from ray import serve as ray_serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    host, port = client.http_config.host, client.http_config.port
    if (host, port) != (sv.host, sv.port):
        raise ConfigError(
            f"serve: Ray Serve already listens on {host}:{port} in this cluster and keeps those "
            f"HTTP options; set serve.host={host} serve.port={port}, or stop it first "
            "(`serve shutdown`)"
        )
    apps = ray_serve.status().applications
    keyed_apps = sorted(name for name, app in apps.items() if KEYED_INGRESS in app.deployments)
    if keyed_apps and not keyed:
        raise ConfigError(
            f"serve: Ray Serve already serves {keyed_apps} behind an API key; set "
            f"{sv.api_key_env} to deploy beside or over it, or stop it first (`serve shutdown`)"
        )


def serve(cfg: ExperimentConfig, blocking: bool = True) -> dict[str, Any]:
    """Deploy the app and return where it answers; with `blocking`, keep it up until Ctrl-C and
    then delete it (a non-blocking call leaves it running in the cluster)."""
    from ray import serve as ray_serve

    models = hosted_models(cfg)
    sv = cfg.serve
    if sv.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(sv.api_key_env):
        raise ConfigError(
            f"serve.host: {sv.host} would expose the API beyond this machine without a key; "
            f"set {sv.api_key_env} (requests then need `Authorization: Bearer <key>`)"
        )
    init_ray(cfg)
    check_running_serve(sv, keyed=bool(os.environ.get(sv.api_key_env)))
    ray_serve.start(http_options={"host": sv.host, "port": sv.port})
    ray_serve.run(openai_app(cfg, models), name=sv.app_name, route_prefix="/")
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


def rayservice_app(args: dict[str, Any]):
    """A RayService's `import_path` (`w2sr.stages.serve:rayservice_app`): the app `w2sr serve`
    deploys, for the config file `args["config"]` with `args["overrides"]` (`key=value`, as on
    the command line). The models are found in the run dir as `w2sr serve` finds them (trained
    students live in fingerprinted folders), so a manifest names a config, never a model folder.
    A cluster's Serve proxy listens beyond loopback: without the key in `serve.api_key_env` the
    application is not deployed."""
    unknown = sorted(set(args) - {"config", "overrides"})
    if unknown or "config" not in args:
        raise ConfigError(f"RayService args: expected config and overrides, got {sorted(args)}")
    cfg = load_config(args["config"], list(args.get("overrides", [])))
    if not os.environ.get(cfg.serve.api_key_env):
        raise ConfigError(
            f"{cfg.serve.api_key_env} is not set: a cluster serves models only behind an API key"
        )
    return openai_app(cfg, hosted_models(cfg))
