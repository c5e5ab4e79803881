"""Reload on SIGHUP: certificates, keys, trust roots, the users file and the lists file.

Every file is read and checked first (a key that does not fit its certificate,
a malformed users file, a list the relay cannot route); only when all of them
load does the relay switch to all of them at once.  Otherwise nothing changes
and one error line names the file and what is wrong, so a half-finished
certificate renewal never takes a listener down.  New TLS connections get the
new certificate; established ones keep theirs until they end.
"""

from __future__ import annotations

from relayd.bootstrap import read_lists
from relayd.config import RelaydConfig
from relayd.consent.lists import ListDirectory, URIList, URIListError
from relayd.logs import logger
from relayd.net.tls import (
    TLSMaterial,
    TLSSetupError,
    fingerprint,
    load_identity,
    load_trust_roots,
)
from relayd.users import UsersFile, UsersFileError

log = logger()


class Reloader:
    """Rereads the files ``config`` names and switches the running relay to them."""

    def __init__(
        self,
        config: RelaydConfig,
        tls: TLSMaterial,
        users: UsersFile,
        directory: ListDirectory,
        domain: str,
    ) -> None:
        self._config = config
        self._tls = tls
        self._users = users
        self._directory = directory
        self._domain = domain

    def reload(self) -> bool:
        """Read everything, then switch to it; False (and nothing changed) on any error."""
        config = self._config
        lists: tuple[URIList, ...] | None = None
        try:
            identity = self._tls.identity  # the generated certificate: nothing to reread
            if config.tls.certificate:
                identity = load_identity(config.tls.certificate, config.tls.private_key)
            trust_roots = (
                load_trust_roots(config.msrp.ca_certificates)
                if config.msrp.ca_certificates
                else None
            )
            switch_tls = self._tls.stage(identity, trust_roots)
            switch_users = self._users.stage_reload()
            if config.sip.lists:
                lists = read_lists(config.sip.lists, self._domain)
        except (TLSSetupError, UsersFileError) as e:
            return self._refused(str(e))
        except URIListError as e:
            return self._refused(f"{config.sip.lists}: {e}")
        switch_tls()
        switch_users()
        if lists is not None:
            self._directory.replace_file_lists(lists)
        certificate = (
            f"certificate {config.tls.certificate} (SHA-256 {fingerprint(identity.chain[0])[:16]}…)"
            if config.tls.certificate
            else "no [tls] certificate (the generated self-signed one has nothing to reread)"
        )
        log.info(
            "Reloaded: {certificate}, users file {users} ({count} entries){lists}",
            certificate=certificate,
            users=self._users.path,
            count=len(self._users),
            lists=f", {len(lists)} lists from {config.sip.lists}" if lists is not None else "",
        )
        return True

    def _refused(self, reason: str) -> bool:
        log.error(
            "Reload refused, still serving the previous certificates, users and lists: {reason}",
            reason=reason,
        )
        return False
