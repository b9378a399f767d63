"""Every hook a dpo plugin can implement. The docstrings are the contract.

A plugin is a module (or object) with functions decorated ``@dpo.hookimpl``, made known through
the ``dpo`` entry-point group::

    [project.entry-points.dpo]
    my_plugin = "my_package.plugin"

A plugin that raises in any of its hooks is reported by ``dpo plugins`` and registers nothing:
every class it handed over is withdrawn, and naming one says that the plugin failed. A name that
a built-in also registers is shown as a clash; it is an error where the user names it and means
the built-in where dpo picks it (``dpo.core.interfaces.registry``).
"""

import pluggy

PROJECT = "dpo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dpo_register_backends(register):
    """Hand over hardware backends: call ``register(cls)`` once per ``dpo.Backend`` subclass.
    The class attribute ``name`` is what ``--backend`` selects; ``device_type`` (required)
    decides the speed defaults the class inherits (see ``dpo.Backend``)."""


@hookspec
def dpo_register_losses(register):
    """Hand over preference losses: call ``register(cls)`` once per ``dpo.Loss`` subclass.
    The class attribute ``name`` is what ``--loss`` selects."""


@hookspec
def dpo_register_stopping_policies(register):
    """Hand over stopping policies: call ``register(cls)`` once per ``dpo.StoppingPolicy``
    subclass. The class attribute ``name`` is what ``--stop`` selects."""


@hookspec
def dpo_register_data_formats(register):
    """Hand over data formats: call ``register(cls)`` once per ``dpo.DataFormat`` subclass.
    The class attribute ``name`` is what ``--format`` selects. A format that reads files of its
    own layout (TSV, Parquet, ...) sets ``suffixes`` and implements ``read(path)`` (see
    ``dpo.DataFormat``)."""


@hookspec
def dpo_register_loggers(register):
    """Hand over loggers: call ``register(cls)`` once per ``dpo.Logger`` subclass. The class
    attribute ``name`` is what ``--log-to`` selects; ``requires`` and ``extra`` say what it
    needs installed (checked before a run writes anything). The run hands each selected logger
    every ``metrics.jsonl`` record, tables and texts, on the main process only (see
    ``dpo.Logger``)."""


@hookspec
def dpo_register_commands(app):
    """Add commands to the ``dpo`` command line: ``app`` is the root ``typer.Typer``.
    Use ``@app.command(rich_help_panel="Plugins")`` so they are listed apart."""
