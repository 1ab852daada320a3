"""Which code a model spec may run, decided before anything it names is imported.

A spec's ``architecture`` names the factory of its network in one of three ways:

- a built-in name (:data:`BUILT_IN`): a network of this package;
- the name an installed package registers its factory under, in the entry-point
  group :data:`ENTRY_POINT_GROUP` (in that package's ``pyproject.toml``:
  ``[project.entry-points."fcn_pipeline.architectures"]`` then
  ``my-net = "mypkg.nets:my_net"``); built-in names win over registered ones;
- an import path ``package.module:factory``. A spec is a data file that can come
  from anyone, and importing and calling what it names runs that code
  (``os:system`` with ``arguments: {command: ...}`` would run a command), so an
  import path is refused unless the run trusts the spec's code
  (``--trust-spec-code``; ``trust_spec_code: true`` in a workflow;
  ``FCN_PIPELINE_TRUST_SPEC_CODE=1``), and a path into the standard library or the
  builtins is refused even then. Trust is full code execution: that refusal is a
  filter on names that catches mistakes, not a sandbox (a trusted spec reaches
  commands through any installed package that runs them).

:func:`resolve_architecture` decides from the spec and the installed packages'
metadata alone (``importlib.metadata`` reads files; it imports nothing), so the
refusal is a usage error before torch loads. :mod:`pipeline.model` imports the
factory it returns, after the weights' checksum was verified, and checks where the
imported object comes from with :func:`refuse_standard_library`.

Pure: the standard library only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata

from pipeline.modelspec import ModelSpec

#: The entry-point group in which installed packages register network factories.
ENTRY_POINT_GROUP = "fcn_pipeline.architectures"
#: The command-line option that lets a spec's import path run.
TRUST_OPTION = "--trust-spec-code"
#: The bundled demo model's architecture: trained on generated sample scenes only.
DEMO_ARCHITECTURE = "demo-fcn"
#: Built-in architecture names -> their factory, ``module:attribute`` in this package.
BUILT_IN: dict[str, str] = {
    "fcn32s-vgg16": "pipeline.models:fcn32s_vgg16",
    "fcn16s-vgg16": "pipeline.models:fcn16s_vgg16",
    "fcn8s-vgg16": "pipeline.models:fcn8s_vgg16",
    "fcn-alexnet": "pipeline.models:fcn_alexnet",
    "unet-small": "pipeline.models:unet_small",
    DEMO_ARCHITECTURE: "pipeline.demo:demo_fcn",
}
#: What an :class:`Architecture` is, by where its factory comes from.
BUILT_IN_KIND, ENTRY_POINT_KIND, IMPORT_PATH_KIND = "built-in", "entry point", "import path"
#: Module names no spec may name, trusted or not (with ``sys.stdlib_module_names``).
_NEVER = frozenset({"builtins", "__main__"})


@dataclass(frozen=True)
class Architecture:
    """Where a spec's network factory comes from.

    ``module`` is imported and ``attribute`` (dotted) looked up in it; ``origin`` says
    who provides the code (``fcn-pipeline``, ``mypkg 0.1``, the spec file); ``note``,
    when set, is a line worth showing (a built-in name an installed package also
    registers).
    """

    name: str
    kind: str
    module: str
    attribute: str
    origin: str
    note: str | None = None

    @property
    def target(self) -> str:
        """``module:attribute``."""
        return f"{self.module}:{self.attribute}"


def is_standard_library(module: str) -> bool:
    """True when ``module`` (dotted, such as ``os.path``) belongs to the standard library,
    the builtins or ``__main__``."""
    root = module.partition(".")[0]
    return root in _NEVER or root in sys.stdlib_module_names


def refuse_standard_library(spec: ModelSpec, module: str, how: str = "") -> None:
    """Raise :class:`ModelSpecError` when ``module`` is the standard library's; ``how``
    says how the spec reached it (such as "as registered by mypkg 0.1")."""
    if is_standard_library(module):
        reach = f" {how}" if how else ""
        raise spec.error(
            "architecture",
            f"{spec.architecture}{reach} leads into the standard library ({module}), which a "
            f"spec may never run, not even with {TRUST_OPTION}; name a network factory",
        )


def resolve_architecture(spec: ModelSpec, *, trust_code: bool) -> Architecture:
    """Decide which factory ``spec.architecture`` names, importing nothing.

    Args:
        spec: The model spec.
        trust_code: The run trusts the spec's code (``--trust-spec-code``): an import
            path may name any module but the standard library's.

    Returns:
        The factory's module and attribute, and where they come from.

    Raises:
        ModelSpecError: one line naming the spec file and ``architecture``: a name that
            is neither built in nor registered by an installed package, or that two
            installed packages register; an import path without ``trust_code``; a
            path or registration into the standard library or the builtins; an ONNX
            spec (its graph is the network: it names no factory).
    """
    name = spec.architecture
    if name is None:
        raise spec.error("architecture", f"is not given: weights {spec.weights.name} is an ONNX "
                                         "graph, which ONNX Runtime runs with no factory")
    if not spec.is_import_path:
        return _named(spec, name)
    module, _, attribute = name.partition(":")
    refuse_standard_library(spec, module)
    if not trust_code:
        built_in = next((k for k, v in BUILT_IN.items() if v == name), None)
        hint = (f"; it is the built-in {built_in}: write architecture: {built_in}"
                if built_in else "")
        raise spec.error(
            "architecture",
            f"{name} is an import path: it runs code that the spec names; pass "
            f"{TRUST_OPTION} (or set trust_spec_code: true in the workflow) only if you trust "
            f"this spec, or use a network an installed package registers under "
            f"{ENTRY_POINT_GROUP}{hint}",
        )
    return Architecture(name, IMPORT_PATH_KIND, module, attribute, spec.source)


def registered_architectures() -> dict[str, list[tuple[str, str, str]]]:
    """Names registered under :data:`ENTRY_POINT_GROUP` by the installed packages ->
    ``(package and version, module, attribute)`` of each registration (the attribute is
    empty when the registration names a module only)."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry, "dist", None)
        package = f"{dist.name} {dist.version}" if dist is not None else "an installed package"
        registration = (package, entry.module, entry.attr or "")
        registrations = found.setdefault(entry.name, [])
        if registration not in registrations:
            registrations.append(registration)
    return found


def _named(spec: ModelSpec, name: str) -> Architecture:
    registrations = registered_architectures()
    mine = registrations.get(name, [])
    if name in BUILT_IN:
        module, _, attribute = BUILT_IN[name].partition(":")
        note = None
        if mine:
            others = ", ".join(f"{p} ({m}:{a})" for p, m, a in mine)
            note = (f"{spec.source}: architecture {name} is built in, and {others} also "
                    f"registers it under {ENTRY_POINT_GROUP}; the built-in {name} runs (give "
                    "that entry point another name to use it)")
        return Architecture(name, BUILT_IN_KIND, module, attribute, "fcn-pipeline", note)
    if not mine:
        registered = ", ".join(sorted(registrations)) or "none"
        raise spec.error(
            "architecture",
            f"{name!r} is neither a built-in architecture ({', '.join(sorted(BUILT_IN))}) nor "
            f"registered by an installed package under {ENTRY_POINT_GROUP} (registered: "
            f"{registered}); install the package that registers it, or give an import path "
            f"package.module:factory and pass {TRUST_OPTION}",
        )
    if len(mine) > 1:
        raise spec.error(
            "architecture",
            f"{name} is registered under {ENTRY_POINT_GROUP} by more than one installed "
            f"package ({', '.join(f'{p} as {m}:{a}' for p, m, a in sorted(mine))}), so which "
            "code would run is not clear; uninstall all but one of them",
        )
    package, module, attribute = mine[0]
    how = f"as {package} registers it ({module}:{attribute})"
    if not attribute:
        raise spec.error("architecture", f"{name}, as {package} registers it ({module}), names "
                                         "a module, not a factory (module:factory)")
    refuse_standard_library(spec, module, how)
    return Architecture(name, ENTRY_POINT_KIND, module, attribute, package)
