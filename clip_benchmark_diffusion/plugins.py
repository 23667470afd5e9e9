"""Plugin loading: built-in recipes and entry points, loaded once, lazily."""
from __future__ import annotations

import os
from importlib import metadata

import pluggy

from clip_benchmark_diffusion import hookspecs

ENTRY_POINT_GROUP = "clip_benchmark_diffusion"
# Comma-separated entry-point names to load; unset loads all (like llm's LLM_LOAD_PLUGINS).
ALLOW_ENV = "CLIP_BENCHMARK_DIFFUSION_PLUGINS"
DEFAULT_PLUGINS = ("clip_benchmark_diffusion.builtin_recipes", "clip_benchmark_diffusion.families.builtin")

_manager: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, creating it on first use."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for module_name in DEFAULT_PLUGINS:
            pm.register(__import__(module_name, fromlist=["_"]), name=module_name)
        allowed = os.environ.get(ALLOW_ENV)
        allow = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.value in DEFAULT_PLUGINS or (allow is not None and ep.name not in allow):
                continue
            if pm.get_plugin(ep.name) is None:
                pm.register(ep.load(), name=ep.name)
        pm.check_pending()   # a misspelt hook implementation fails loudly instead of registering nothing
        _manager = pm
    return _manager


def loaded_plugins() -> list[str]:
    """Names of the plugins that are loaded, for ``clip_benchmark_diffusion plugins``."""
    return sorted(name for name, _ in plugin_manager().list_name_plugin())


def locate_weights(value: str) -> str | None:
    """The folder a plugin maps ``value`` to (first answer wins), or None when no plugin claims it."""
    return plugin_manager().hook.locate_weights(value=value)


def register_open_clip_configs() -> None:
    """Make every plugin's open_clip model configs known to open_clip by name (cheap: small JSON files)."""
    configs: list[str] = []
    plugin_manager().hook.register_open_clip_configs(register=configs.append)
    if configs:
        import open_clip

        for config in configs:
            open_clip.add_model_config(config)
