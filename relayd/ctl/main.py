"""``relayctl``: manage relay users, talk MSRP through relays, edit XCAP permissions and lists.

Every failure is one ``relayctl: …`` line on stderr and a non-zero exit status
(1 for failures, 2 for usage errors, 130 when interrupted); tracebacks are for
bugs only, and even those are reduced to one line.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import textwrap
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from twisted.internet import defer
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver

from relayd.ctl import accounts, chat, consent, network, status, store, xcap
from relayd.ctl.receiving import check_output
from relayd.ctl.settings import (
    PASSWORD_ENV,
    Credentials,
    CtlError,
    Locations,
    locate,
    relay_uri,
    resolve_credentials,
    split_to_and_file,
    trust_anchor,
)
from relayd.ctl.sipua import SIPUserAgent, relay_address, resolve
from relayd.msrp.client import MSRPClientError
from relayd.msrp.uri import MSRPURI

PROG = "relayctl"
DEBUG_ENV = "RELAYCTL_DEBUG"
"""Set to 1 to see Twisted's log (and tracebacks) on stderr."""

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_EPILOG = """\
Defaults follow the relay's own: data directory ~/.local/state/relayd (or the
[relay] data_dir of --config), users file users.htdigest in it, realm
'localhost' for the self-signed default setup.  Right after a first
'twistd -n msrprelay' on defaults, 'relayctl auth msrps://localhost:2855' works
as is: it trusts the relay's self-signed certificate and uses the generated
user from credentials.txt.
"""


_USERS_HELP = (
    "htdigest users file (default: [auth] users, else users.htdigest in the data directory)"
)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``relayctl: …`` line like every other failure."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _add_credential_options(access: Any) -> None:
    """Digest credentials, shared by the MSRP, XCAP and SIP commands."""
    access.add_argument(
        "--user",
        help="user name for digest AUTH (default: username= of the credentials file)",
    )
    access.add_argument(
        "--password-file",
        metavar="FILE",
        help=f"read the password from the first line of FILE (else ${PASSWORD_ENV}, the"
        " credentials file without --user, or a prompt on a terminal)",
    )
    access.add_argument(
        "--credentials",
        metavar="FILE",
        help="username=/password= file used when --user is not given"
        " (default: credentials.txt in the data directory, written by the relay on first start)",
    )


def _add_access_options(access: Any) -> None:
    """Digest credentials and TLS trust, shared by the MSRP and XCAP commands."""
    _add_credential_options(access)
    access.add_argument(
        "--ca",
        metavar="PEM",
        help="CA or self-signed certificate to trust for the first relay (default for"
        " localhost/127.0.0.1/::1:"
        " the relay's self-signed tls/selfsigned-cert.pem in the data directory if it exists;"
        " otherwise the system's trust roots)",
    )


def build_parser() -> argparse.ArgumentParser:
    locations = _Parser(add_help=False)
    where = locations.add_argument_group("relay files")
    where.add_argument(
        "--config",
        metavar="INI",
        help="the relay's configuration file, to find its data directory, users file and realm",
    )
    where.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the relay's data directory (default: [relay] data_dir, ~/.local/state/relayd)",
    )

    relays = _Parser(add_help=False)
    access = relays.add_argument_group("relay access")
    _add_access_options(access)
    access.add_argument(
        "--expires",
        type=_positive_int,
        metavar="SECONDS",
        help="session lifetime to ask for in AUTH (default: the relay's)",
    )

    xcap_access = _Parser(add_help=False)
    server = xcap_access.add_argument_group("XCAP server access")
    server.add_argument(
        "--xcap",
        metavar="URL",
        help="XCAP root URL (default: [xcap] public_url of --config, else"
        " https://<hostname or listen interface>:<port><root> from [xcap] listen,"
        " https://127.0.0.1:4443/xcap-root on defaults)",
    )
    _add_access_options(server)
    server.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="give up on a request after this long (default: 30)",
    )
    server.add_argument("--json", action="store_true", help="machine-readable output")

    parser = _Parser(
        prog=PROG,
        description="Manage relayd users; authenticate, send and receive files through"
        " MSRP relays (RFC 4975, RFC 4976).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, parents: list[_Parser]) -> Any:
        return commands.add_parser(
            name,
            help=summary,
            description=textwrap.fill(summary, 79),
            parents=parents,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    adduser = command(
        "adduser",
        "Add a user to the relay's users file, or change its password.",
        [locations],
    )
    adduser.add_argument("username")
    adduser.add_argument("--users", metavar="FILE", help=_USERS_HELP)
    adduser.add_argument("--realm", help="digest realm (default: the relay's realm)")
    source = adduser.add_mutually_exclusive_group()
    source.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )
    source.add_argument(
        "--generate",
        action="store_true",
        help="generate a random password and print it as password=…",
    )

    deluser = command("deluser", "Remove a user from the relay's users file.", [locations])
    deluser.add_argument("username")
    deluser.add_argument("--users", metavar="FILE", help=_USERS_HELP)
    deluser.add_argument("--realm", help="digest realm (default: the relay's realm)")

    users = command("users", "List the users file: user and realm per line.", [locations])
    users.add_argument("--users", metavar="FILE", help=_USERS_HELP)

    auth = command(
        "auth",
        "AUTH with one or more relays and print the Use-Path and Expires granted.",
        [locations, relays],
    )
    auth.add_argument(
        "relay",
        nargs="+",
        help="relay URI, e.g. msrps://localhost:2855 (';tcp' is added); a domain without a"
        " port is looked up by DNS SRV _msrps._tcp.<domain> (a relay pool); several are chained",
    )

    receive = command(
        "receive",
        "Wait for files: print 'Path: …' (give it to the sender's --to), then write each"
        " message received and print its size and SHA-256.",
        [locations, relays],
    )
    receive.add_argument(
        "--via",
        action="append",
        required=True,
        metavar="URI",
        help="relay to receive through; repeat for a chain, nearest relay first"
        " (the same credentials are used with each)",
    )
    receive.add_argument(
        "--output",
        metavar="FILE|DIR",
        help="file to write the message to, or a directory for one file per Message-ID"
        " (default: the current directory)",
    )
    receive.add_argument(
        "--count",
        type=_positive_int,
        default=1,
        metavar="N",
        help="exit after this many messages (default: 1)",
    )
    receive.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="give up when the messages have not all arrived by then (default: wait)",
    )

    send = command(
        "send",
        "Send a file through relays with Success-Report: yes; print its size and SHA-256"
        " once the receiver reports delivery.",
        [locations, relays],
    )
    send.add_argument("file", nargs="?", help="file to send (streamed from disk)")
    send.add_argument(
        "--via",
        action="append",
        required=True,
        metavar="URI",
        help="relay to send through; repeat for a chain, nearest relay first"
        " (the same credentials are used with each)",
    )
    send.add_argument(
        "--to",
        action="extend",
        nargs="+",
        required=True,
        metavar="URI",
        help="the receiver's path as printed by 'relayctl receive': one quoted argument or"
        " several words (the file may follow them)",
    )
    send.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=network.DEFAULT_CHUNK_BYTES,
        metavar="BYTES",
        help=f"bytes per SEND chunk (default: {network.DEFAULT_CHUNK_BYTES})",
    )
    send.add_argument(
        "--window",
        type=_positive_int,
        default=network.DEFAULT_WINDOW,
        metavar="N",
        help="chunks sent before waiting for the oldest one's 200"
        f" (default: {network.DEFAULT_WINDOW})",
    )
    send.add_argument(
        "--content-type",
        default="application/octet-stream",
        help="Content-Type of the message (default: application/octet-stream)",
    )
    send.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="wait this long for the delivery REPORT after the last chunk (default: 60)",
    )
    chatting = command(
        "chat",
        "Call a user (or list) and chat: each line typed is sent as an MSRP message"
        " through the relay, each one received is printed; Ctrl-D hangs up."
        " With --answer, wait registered for a call and do the same.",
        [locations, relays],
    )
    who = chatting.add_mutually_exclusive_group(required=True)
    who.add_argument("target", nargs="?", help="SIP URI to call, or a user name of the SIP domain")
    who.add_argument("--answer", action="store_true", help="wait for a call instead")
    chatting.add_argument(
        "--via",
        action="append",
        required=True,
        metavar="URI",
        help="MSRP relay for the messages, e.g. msrps://localhost:2855; repeat for a chain",
    )
    chatting.add_argument(
        "--sip",
        metavar="HOST[:PORT]",
        help="the SIP relay, over UDP (default: the first --via host, port 5060)",
    )
    chatting.add_argument("--domain", help="SIP domain of the users (default: the host of --sip)")
    chatting.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="with --answer: give up when no call came by then (default: wait)",
    )
    chatting.add_argument(
        "--save-dir",
        type=Path,
        metavar="DIR",
        help="where files the peer sends (/file) are saved, never over an existing file"
        " (default: the current directory)",
    )
    xcap.add_parsers(command, [locations, xcap_access])
    _add_consent_parser(command, [locations])

    stores = command(
        "store",
        "Bring the permission store's schema up to date, or copy a store between SQLite"
        " and PostgreSQL.",
        [],
    )
    actions = stores.add_subparsers(dest="action", metavar="ACTION", required=True)
    migrate = actions.add_parser(
        "migrate",
        help="apply the schema migrations the store lacks (the relay does it at start too)",
        parents=[locations],
    )
    migrate.add_argument(
        "store", nargs="?", help=f"{store.STORE_HELP} (default: the [store] of --config)"
    )
    copy = actions.add_parser(
        "copy",
        help="copy every document, consent and registration into an empty store"
        " (run it while no relay writes the source)",
    )
    copy.add_argument("source", help=store.STORE_HELP)
    copy.add_argument("target", help=store.STORE_HELP)
    status_parser = command(
        "status",
        "Print the running relay's health, versions, uptime, listeners and main counts"
        " (from its [metrics] listen); exit 1 when it is not healthy.",
        [locations],
    )
    status_parser.add_argument(
        "--url",
        metavar="URL",
        help="the metrics listener, http://host:port (default: [metrics] listen of --config)",
    )
    status_parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up on a request after this long (default: 10)",
    )
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _add_consent_parser(command: Callable[..., Any], parents: list[_Parser]) -> None:
    """``consent request|watch``: the sender's part of the consent flow over SIP/UDP."""
    sip_access = _Parser(add_help=False)
    relay = sip_access.add_argument_group("SIP relay access (UDP)")
    relay.add_argument(
        "--relay",
        required=True,
        metavar="HOST[:PORT]",
        help="the relay's SIP UDP listener, e.g. 127.0.0.1:5060 (port default 5060)",
    )
    relay.add_argument(
        "--domain",
        help="the relay's SIP domain, the host of your address (default: the --relay host)",
    )
    _add_credential_options(relay)
    relay.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="request: wait this long for each answer (at most 32);"
        " watch: give up when not all are granted by then (default: 600)",
    )
    relay.add_argument("--json", action="store_true", help="machine-readable output")
    group = command(
        "consent",
        "Ask list members for consent and wait for it (the sender's part, RFC 5360)."
        " The relay offers no way to learn who is missing without sending: give"
        " 'request' the consent URIs of a 470 you got.",
        [],
    )
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    ask = actions.add_parser(
        "request",
        help="send one CONSENT per consent URI and print each answer and wait-permission URI",
        parents=[*parents, sip_access],
    )
    ask.add_argument(
        "uri",
        nargs="*",
        help="consent URIs from a 470's Permission-Missing header",
    )
    ask.add_argument(
        "--from-470",
        metavar="FILE",
        help="read the consent URIs from the pasted 470 (its Permission-Missing lines) or"
        " one URI a line; '-' for standard input",
    )
    ask.add_argument(
        "--methods",
        default="MESSAGE",
        help="comma-separated methods to ask consent for (default: MESSAGE)",
    )
    watch = actions.add_parser(
        "watch",
        help="subscribe to wait-permission URIs and print each change until all are granted",
        parents=[*parents, sip_access],
    )
    watch.add_argument("uri", nargs="+", help="wait-permission URIs printed by 'consent request'")


def consent_command(args: argparse.Namespace) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """The coroutine for ``consent request|watch`` (credentials resolved here: prompts)."""
    if args.action == "request":
        text = "\n".join(args.uri)
        if args.from_470:
            source = sys.stdin if args.from_470 == "-" else None
            text += "\n" + (source.read() if source else Path(args.from_470).read_text())
        uris = consent.consent_uris(text)
        methods = consent.consent_methods(args.methods)
    host, port = relay_address(args.relay)
    credentials = _credentials(args, locate(args.config, args.data_dir))
    out = sys.stdout

    async def work(reactor: Any) -> None:
        client = SIPUserAgent(reactor, (host, port), credentials, args.domain or host, args.timeout)
        client.start()
        try:
            if args.action == "request":
                await consent.run_request(client, uris, methods, args.json, out)
            else:
                expires = int(args.timeout) + 1
                await consent.run_watch(client, args.uri, expires, args.json, out)
        finally:
            await client.close()

    return work


def _interactive() -> bool:
    return sys.stdin.isatty()


def run_local(args: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO) -> None:
    """The commands that only touch files or the store's database: no reactor."""
    if args.command == "store":
        if args.action == "copy":
            store.copy(store.parse_store(args.source), store.parse_store(args.target), out)
        else:
            spec = args.store and store.parse_store(args.store)
            store.migrate(spec or store.configured_store(args.config, args.data_dir), out)
        return
    locations = locate(args.config, args.data_dir)
    path = Path(args.users) if args.users else locations.users_path
    if args.command == "users":
        accounts.list_users(path, out, err)
        return
    realm = args.realm or locations.realm
    if args.command == "deluser":
        accounts.remove_user(path, realm, args.username, out)
        return
    password = accounts.new_password(
        args.password_stdin, args.generate, stdin, _interactive(), getpass.getpass
    )
    default_file = not args.users and path == locations.data_dir / "users.htdigest"
    accounts.add_user(path, realm, args.username, password, out, create_directory=default_file)


def _credentials(args: argparse.Namespace, locations: Locations) -> Credentials:
    """The account of a command that talks to the relay, MSRP or XCAP alike: from
    ``--user``/``--password-file``/``--credentials``, the environment, or a prompt."""
    return resolve_credentials(
        args.user,
        args.password_file,
        args.credentials,
        locations,
        os.environ,
        _interactive(),
        getpass.getpass,
    )


def relay_access(
    args: argparse.Namespace, relays: list[str], locations: Locations
) -> network.RelayAccess:
    """Everything a network command needs, resolved before the reactor starts (prompts)."""
    uris = [relay_uri(text) for text in relays]
    return network.RelayAccess(
        uris, _credentials(args, locations), trust_anchor(args.ca, uris[0], locations), args.expires
    )


def network_command(args: argparse.Namespace) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """The coroutine to run under the reactor for ``auth``, ``receive``, ``send`` or ``chat``."""
    if args.command == "chat":
        return chat_command(args)
    locations = locate(args.config, args.data_dir)
    out, err = sys.stdout, sys.stderr
    if args.command == "auth":
        access = relay_access(args, args.relay, locations)
        return lambda reactor: network.run_auth(reactor, access, out)
    if args.command == "receive":
        output = Path(args.output) if args.output else None
        check_output(output, args.count)  # before any prompt or connection
        access = relay_access(args, args.via, locations)
        return lambda reactor: network.run_receive(
            reactor, access, output, args.count, args.timeout, out
        )
    to, file_path = split_to_and_file(args.to, args.file)
    network.open_for_sending(file_path)[0].close()  # fail before connecting
    access = relay_access(args, args.via, locations)
    return lambda reactor: network.run_send(
        reactor,
        access,
        to,
        file_path,
        args.chunk_size,
        args.window,
        args.content_type,
        args.timeout,
        out,
        err,
    )


def chat_command(args: argparse.Namespace) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """The coroutine for ``chat``: addresses and credentials resolved first (prompts)."""
    locations = locate(args.config, args.data_dir)
    access = relay_access(args, args.via, locations)
    sip_text = args.sip or MSRPURI.parse(access.relays[0]).host
    domain = args.domain or chat.host_of(sip_text)
    target = args.target and chat.target_uri(args.target, domain)
    settings = chat.ChatAccess(access, resolve(*relay_address(sip_text)), domain)
    out, err = sys.stdout, sys.stderr
    save_dir = chat.check_save_dir(args.save_dir or Path())

    def work(reactor: Any) -> Coroutine[Any, Any, None]:
        return chat.run_terminal_chat(reactor, settings, target, args.timeout, out, err, save_dir)

    return work


def xcap_command(args: argparse.Namespace) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """The coroutine for ``permissions`` or ``lists`` (credentials resolved here: prompts)."""
    xcap.check_arguments(args)
    locations = locate(args.config, args.data_dir)
    url = args.xcap or xcap.default_xcap_url(args.config)
    access = xcap.XCAPAccess(
        url, _credentials(args, locations), xcap.xcap_trust(args.ca, url, locations), args.timeout
    )
    out = sys.stdout
    return lambda reactor: xcap.run_xcap_command(reactor, access, args, out)


def status_command(args: argparse.Namespace) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """The coroutine for ``status`` (the URL resolved here: a bad one fails at once)."""
    url = status.check_url(args.url) if args.url else status.default_url(args.config)
    out = sys.stdout
    return lambda reactor: status.run_status(reactor, url, args.timeout, args.json, out)


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()
    return EXIT_FAILURE


def _one_line(error: BaseException) -> str:
    if isinstance(error, CtlError | MSRPClientError):
        return str(error)
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return f"internal error: {type(error).__name__}: {error} (set {DEBUG_ENV}=1 for details)"


def _quiet_twisted_log() -> None:
    """Twisted prints critical log events (unhandled Deferred errors) as tracebacks."""
    observers = []
    if os.environ.get(DEBUG_ENV):
        observers.append(textFileLogObserver(sys.stderr))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)


def _react(work: Callable[[Any], Coroutine[Any, Any, None]]) -> int:
    state = {"done": False, "interrupted": False}

    async def guarded(reactor: Any) -> None:
        def before_shutdown() -> None:
            if not state["done"]:
                state["interrupted"] = True

        reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
        try:
            await work(reactor)
        except (defer.CancelledError, Exception) as e:
            state["done"] = True
            if state["interrupted"]:
                raise SystemExit(EXIT_INTERRUPTED) from None  # the closing is ours, not news
            if os.environ.get(DEBUG_ENV) and not isinstance(e, CtlError):
                raise
            raise SystemExit(_fail(_one_line(e))) from None
        state["done"] = True

    try:
        react(guarded)
    except SystemExit as e:
        if state["interrupted"]:
            _fail("interrupted")
            return EXIT_INTERRUPTED
        return e.code if isinstance(e.code, int) else EXIT_FAILURE
    return 0  # pragma: no cover  (react always exits)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; the exit status is returned, never raised."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        if args.command in ("adduser", "deluser", "users", "store"):
            run_local(args, sys.stdin, sys.stdout, sys.stderr)
            return 0
        if args.command in ("permissions", "lists"):
            work = xcap_command(args)
        elif args.command == "status":
            work = status_command(args)
        elif args.command == "consent":
            work = consent_command(args)
        else:
            work = network_command(args)
    except (CtlError, OSError) as e:
        return _fail(_one_line(e))
    except (KeyboardInterrupt, EOFError):
        sys.stderr.write("\n")
        _fail("interrupted")
        return EXIT_INTERRUPTED
    _quiet_twisted_log()
    return _react(work)


def main() -> NoReturn:
    """Console-script entry point (``relayctl = relayd.ctl.main:main``)."""
    sys.exit(run())


if __name__ == "__main__":
    main()
