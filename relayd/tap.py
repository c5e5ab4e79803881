"""``twistd msrprelay``: options, then the service (the shape of twisted/web/tap.py)."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from twisted.python import usage

from relayd.bootstrap import Prepared, prepare, prepare_shared
from relayd.config import SCHEMA, ConfigError, example_ini, load_config
from relayd.logs import set_level
from relayd.service import build_service
from relayd.workers import (
    WORKER_ENVIRONMENT,
    WorkerSupervisor,
    follow_parent,
    parse_worker,
    shared_ports_in_use,
    worker_command,
    worker_environment,
)

PLUGIN = "msrprelay"
"""The twistd subcommand (twisted/plugins/relayd_plugin.py); workers are started with it."""


class ConfigRefused(SystemExit):
    """A configuration that cannot start: its one line is already on stderr.

    Not a ``usage.UsageError``: twistd would print its whole usage text before
    the line, and nothing about the command line was wrong.
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message


def _default(section: str, name: str) -> str:
    return next(k.default for k in SCHEMA if (k.section, k.name) == (section, name))


def _describe() -> str:
    """The long help: the three services and where each listens by default."""
    return (
        "Runs relayd: an MSRP relay (RFC 4976) with digest AUTH, listening on"
        f" {_default('msrp', 'listen')}; a SIP consent relay (URI lists that reach"
        " only members who consented) on"
        f" {' and '.join(_default('sip', 'listen').split())}; and a permission"
        " store over HTTP (XCAP, RFC 4825) for permission and list documents on"
        f" {_default('xcap', 'listen')}.  Without --config it starts on these"
        " loopback defaults with a generated self-signed certificate, an embedded"
        " SQLite store and one generated user (see the data directory).  "
        "--example-config prints a configuration file with every key and its"
        " default; every key can also be set with --set."
    )


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = _describe()
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, "INI configuration file (see --example-config)."],
        ["data-dir", None, None, "Overrides [relay] data_dir."],
        ["hostname", None, None, "Overrides [relay] hostname."],
        ["realm", None, None, "Overrides [auth] realm."],
        ["users", None, None, "Overrides [auth] users (an htdigest file)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["msrp-listen"] = []
        self["set"] = []
        self["arguments"] = []
        self["worker"] = None

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Kept as given: [relay] workers start with the same arguments.
        self["arguments"] = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_msrp_listen(self, description: str) -> None:
        """MSRP listener endpoint string; repeat for several (replaces [msrp] listen)."""
        self["msrp-listen"].append(description)

    def opt_example_config(self) -> None:
        """Print an example configuration file (every key, its default) and exit."""
        sys.stdout.write(example_ini())
        sys.stdout.flush()
        raise SystemExit(0)

    def opt_set(self, assignment: str) -> None:
        """Set any key: --set section.key=value (repeatable)."""
        name, sep, value = assignment.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise usage.UsageError(f"--set expects section.key=value, got {assignment!r}")
        self["set"].append(((section.strip(), key.strip()), value))

    def postOptions(self) -> None:
        overrides: dict[tuple[str, str], str] = {}
        for option, section, key in (
            ("data-dir", "relay", "data_dir"),
            ("hostname", "relay", "hostname"),
            ("realm", "auth", "realm"),
            ("users", "auth", "users"),
        ):
            if self[option] is not None:
                overrides[(section, key)] = self[option]
        if self["msrp-listen"]:
            overrides[("msrp", "listen")] = "\n".join(self["msrp-listen"])
        for key, value in self["set"]:
            overrides[key] = value
        try:
            config = load_config(self["config"], overrides)
            worker = os.environ.get(WORKER_ENVIRONMENT)
            if worker is not None:
                try:
                    self["worker"], _ = parse_worker(worker)
                except ValueError as e:
                    raise ConfigError("environment", "relay", "workers", str(e)) from None
            self["prepared"] = prepare(config)
            if worker is None and config.workers > 1:
                prepare_shared(self["prepared"])
                in_use = shared_ports_in_use(
                    (("sip", config.sip.listen), ("xcap", config.xcap.listen))
                )
                if in_use is not None:
                    section, message = in_use
                    raise ConfigError(
                        config.source_of(section, "listen"), section, "listen", message
                    )
        except ConfigError as e:
            sys.stderr.write(f"twistd: {e}\n")
            sys.stderr.flush()
            raise ConfigRefused(str(e)) from None


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    prepared: Prepared = options["prepared"]
    set_level(prepared.config.log_level)
    worker: int | None = options["worker"]
    count = prepared.config.workers
    if worker is None and count > 1:
        # The parent: it binds nothing and runs the workers (relayd.workers).
        return WorkerSupervisor(
            reactor,
            count,
            command=lambda index: worker_command(options["arguments"], PLUGIN),
            environment=lambda index: worker_environment(index, count),
        )
    if worker is not None:
        follow_parent()
    service = build_service(prepared, reactor, worker)
    tune_garbage_collector()
    return service


GC_GEN0_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """A relay allocates a few dozen short-lived objects per message and keeps a large,
    stable heap (config, schemas, tables). The default collector runs a young-generation
    pass every 700 allocations and rescans that heap; measured by ``bench/sip_cycle.py``
    that cost about a fifth of the relay's CPU. Everything built at start-up is moved out
    of the collector's view (it lives as long as the process) and collections run less
    often; cycles are still collected."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
