"""An opt-in pytest plugin for testing dpo plugins (and dpo itself).

Enable it in the ``conftest.py`` at the root of your tests::

    pytest_plugins = ["dpo.testing"]

or for one run with ``pytest -p dpo.testing``. It adds:

* the marker ``@pytest.mark.backend(name)`` (or ``requires_backend(name)``): the test runs only
  where that backend is registered and available, and is skipped with the backend's own reason
  otherwise (``cuda: this torch build has no CUDA``). A name no installed plugin registers fails
  the test, so a typo cannot silently skip it forever. Works under ``--strict-markers``.
* fixtures: ``dpo_plugin_manager``, ``dpo_catalog``, ``dpo_register``, ``tiny_tokenizer`` and
  ``tiny_model`` (see each one's docstring);
* ``plugin_of(*classes)``: a plugin object that registers test classes (backends, losses,
  stopping policies, data formats, loggers), each through its kind's hook, instead of a class with one
  ``@dpo.hookimpl`` method per kind;
* ``CrashAt``: a stopping policy (``--stop crash-at``) that raises once at the step its
  ``armed_at`` names, like a machine dying mid-run: for tests of resuming;
* ``write_arithmetic_pairs(path)``: a small preference file a tiny-model run learns from;
* ``write_btlm_style_model(directory)``: a tiny model directory that ships its own modelling
  code (``dpo.testing_models.btlm``), loaded with ``trust_remote_code=True``;
* ``command_line(*plugins)``: the ``dpo`` command line with those plugins, as a function that
  runs a command in this process and returns its result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

from dpo.core.interfaces.errors import DpoError
from dpo.core.interfaces.stopping import CONTINUE, Decision, StoppingPolicy
from dpo.core.interfaces.plugins import Catalog, DpoPluginManager, collect, get_plugin_manager, register_plugin

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from dpo.core.interfaces.backend import Backend

MARKER = "backend"

# Per pytest session: building the catalog imports every plugin, and some probes (XLA's) are slow.
_catalog_key = pytest.StashKey[Catalog]()
_reasons_key = pytest.StashKey[dict[str, "str | None"]]()
_error_key = pytest.StashKey[str]()  # on an item whose marker is wrong: why


def requires_backend(name: str) -> pytest.MarkDecorator:
    """``@requires_backend("cuda")`` is ``@pytest.mark.backend("cuda")``."""
    return pytest.mark.backend(name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(name): needs the named dpo backend to be available here; skipped with the "
        "backend's own reason otherwise (dpo.testing)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Decided at collection and turned into an ordinary skip mark, so that the report points
    # at the test (as skipif does), not at this plugin.
    for item in items:
        for mark in item.iter_markers(name=MARKER):
            if len(mark.args) != 1 or not isinstance(mark.args[0], str) or mark.kwargs:
                item.stash[_error_key] = (
                    f"@pytest.mark.{MARKER} takes one backend name, e.g. "
                    f"@pytest.mark.{MARKER}('cuda'); got args={mark.args!r} kwargs={mark.kwargs!r}")
                break
            name = mark.args[0]
            try:
                reason = _unavailable_reason(config, name)
            except DpoError as exc:  # unknown, or registered by two plugins
                item.stash[_error_key] = f"@pytest.mark.{MARKER}({name!r}): {exc}"
                break
            except Exception as exc:  # reported on the marked tests, not as a crashed session
                item.stash[_error_key] = (f"@pytest.mark.{MARKER}({name!r}): cannot load the dpo "
                                          f"plugins: {type(exc).__name__}: {exc}")
                break
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"{name}: {reason}"))


@pytest.hookimpl(tryfirst=True)  # before fixtures are set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    error = item.stash.get(_error_key, None)
    if error is not None:
        pytest.fail(error, pytrace=False)


def _unavailable_reason(config: pytest.Config, name: str) -> str | None:
    """The backend's own reason, asked once per session; raises for unknown names."""
    reasons = config.stash.setdefault(_reasons_key, {})
    if name not in reasons:
        if _catalog_key not in config.stash:
            config.stash[_catalog_key] = collect(get_plugin_manager())
        backend: type[Backend] = config.stash[_catalog_key].backends.get(name)
        reasons[name] = backend.unavailable_reason()
    return reasons[name]


@pytest.fixture
def dpo_plugin_manager() -> DpoPluginManager:
    """A fresh plugin manager, as ``get_plugin_manager()`` builds it for the CLI: built-ins,
    installed entry points, ``DPO_DISABLE_PLUGINS`` honoured. Nothing leaks between tests."""
    return get_plugin_manager()


@pytest.fixture
def dpo_catalog(dpo_plugin_manager: DpoPluginManager) -> Catalog:
    """``collect(dpo_plugin_manager)``: every class the plugins registered, by kind and name.

    Collected when first requested; after registering more plugins with ``dpo_register``, call
    ``collect(dpo_plugin_manager)`` again (or request ``dpo_register`` first)."""
    return collect(dpo_plugin_manager)


@pytest.fixture
def dpo_register(dpo_plugin_manager: DpoPluginManager) -> Iterator[Callable[..., str]]:
    """``dpo_register(plugin, name=None) -> name`` registers a module or object with
    ``@dpo.hookimpl`` functions into ``dpo_plugin_manager`` (validated like an installed plugin)
    and unregisters it after the test, pass or fail. ``name`` defaults to a module's
    ``__name__``, else the object's class name and id; a name already taken is refused."""
    registered: list[str] = []

    def register(plugin: Any, name: str | None = None) -> str:
        if name is None:
            name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
        if dpo_plugin_manager.has_plugin(name):
            # Checked here so that cleanup can never unregister a plugin this fixture did not add.
            raise ValueError(f"a plugin named {name!r} is already registered; pass another name=")
        try:
            register_plugin(dpo_plugin_manager, plugin, name, distribution="dpo.testing")
        except BaseException:
            _unregister(dpo_plugin_manager, name)  # registered, then refused by validation
            raise
        registered.append(name)
        return name

    try:
        yield register
    finally:
        for name in reversed(registered):
            _unregister(dpo_plugin_manager, name)


def plugin_of(*classes: type) -> object:
    """A plugin object whose registration hooks register ``classes``, each through the hook of
    its kind (a ``Backend``, ``Loss``, ``StoppingPolicy``, ``DataFormat`` or ``Logger`` subclass), in the
    order given. Register it like any plugin (``dpo_register(plugin_of(MyLoss))``, or
    ``register_plugin(pm, plugin_of(...), name)``)."""
    from dpo.core.interfaces.hookspecs import hookimpl
    from dpo.core.interfaces.plugins import REGISTRATION_HOOKS

    def hook(matching: list[type]) -> Callable[..., None]:
        def register_all(self: Any, register: Callable[[type], None]) -> None:
            for cls in matching:
                register(cls)

        return hookimpl(register_all)

    methods: dict[str, Any] = {}
    for name, (_, base) in REGISTRATION_HOOKS.items():
        matching = [cls for cls in classes if isinstance(cls, type) and issubclass(cls, base)]
        if matching:
            methods[name] = hook(matching)
    unplaced = [cls for cls in classes
                if not any(isinstance(cls, type) and issubclass(cls, base)
                           for _, base in REGISTRATION_HOOKS.values())]
    if unplaced:
        raise TypeError(f"plugin_of: {unplaced[0]!r} is not a Backend, Loss, StoppingPolicy, "
                        "DataFormat or Logger subclass")
    return type("PluginOf", (), methods)()


TRAINING_COMMANDS = ("run", "sft", "precompute-ref")


def command_line(*plugins: object, entry_points: bool = False) -> Callable[..., Any]:
    """The ``dpo`` command line with the built-ins and ``plugins`` (objects such as
    ``plugin_of(MyLoss)``) registered, as a function: ``call("run", "--model", "tiny", ...)``
    runs it in this process and returns the click ``Result`` (``exit_code``, ``output``). The
    training commands get ``--no-progress``: a test's output is a log, not a terminal.
    ``entry_points``: also load the installed packages' plugins (off: the test's alone)."""
    from typer.testing import CliRunner

    from dpo.cli import make_app

    pm = get_plugin_manager(load_entrypoints=entry_points)
    for number, plugin in enumerate(plugins):
        register_plugin(pm, plugin, f"test-plugin-{number}")
    app = make_app(pm)

    def call(*args: str) -> Any:
        quiet = ["--no-progress"] if args and args[0] in TRAINING_COMMANDS else []
        return CliRunner().invoke(app, [*args[:1], *quiet, *args[1:]])

    return call


def _unregister(pm: DpoPluginManager, name: str) -> None:
    if pm.has_plugin(name):
        pm.unregister(name=name)
    pm.sources.pop(name, None)


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The ``--model tiny`` tokenizer (byte-level BPE, ChatML chat template), built offline."""
    from dpo.core.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A fresh two-layer tiny Llama on the CPU in float32, identical weights in every test
    (seed 0), so tests may train or mutate it freely."""
    from dpo.core.model.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer)


def write_arithmetic_pairs(path: Path, n: int = 24) -> Path:
    """Write ``n`` preference pairs (``preference`` format) to ``path``: "What is a plus b?",
    the right sum chosen and the sum plus one rejected. Enough for a tiny-model run to learn."""
    with path.open("w") as fh:
        for i in range(n):
            a, b = i % 7 + 1, i % 5 + 2
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}? ", "chosen": f"{a + b}.",
                                 "rejected": f"{a + b + 1}."}) + "\n")
    return path


def write_btlm_style_model(directory: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """Write a tiny BTLM-style model (``dpo.testing_models.btlm``: two blocks of four heads,
    64 wide, the tiny tokenizer's vocabulary) to ``directory`` as a model directory that ships
    its own modelling code: ``configuration_btlm.py`` and ``modeling_btlm.py`` beside the
    weights (float32 safetensors, drawn from ``seed``), the tokenizer, and a ``config.json``
    whose ``auto_map`` names the two files. ``AutoModelForCausalLM.from_pretrained(directory,
    trust_remote_code=True)`` loads it offline; without ``trust_remote_code`` transformers
    refuses it. ``dropout``: every dropout probability of the config (training turns them
    off; a saved model keeps them)."""
    import shutil

    import torch

    from dpo.core.model.tiny import VOCAB_MULTIPLE, build_tiny_tokenizer
    from dpo.testing_models.btlm import MODEL_FILES, SOURCE
    from dpo.testing_models.btlm.configuration_btlm import BtlmConfig
    from dpo.testing_models.btlm.modeling_btlm import BtlmLMHeadModel

    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    config = BtlmConfig(vocab_size=-(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
                        n_positions=1024, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                        embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.auto_map = {"AutoConfig": "configuration_btlm.BtlmConfig",
                       "AutoModelForCausalLM": "modeling_btlm.BtlmLMHeadModel"}
    config.architectures = ["BtlmLMHeadModel"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BtlmLMHeadModel(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    for name in MODEL_FILES:
        shutil.copyfile(SOURCE / name, directory / name)
    return directory


class CrashAt(StoppingPolicy):
    """Raises once at step ``CrashAt.armed_at`` (then disarms), like a machine dying mid-run:
    register it (``plugin_of(CrashAt)``), run with ``--stop crash-at``, arm it, and resume."""

    name = "crash-at"
    armed_at: int | None = None

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        if step == CrashAt.armed_at:
            CrashAt.armed_at = None
            raise RuntimeError("simulated crash")
        return CONTINUE
