"""The release ledger's hash chain: what makes an edit, a deletion or a reordering visible.

Each record of one model and environment carries its sequence number, the hash of the record
before it, its own hash (over its fields, the sequence number and that link) and an Ed25519
signature of that hash by the signing key that also signs bundles. The newest record's link is
also kept as the ledger experiment's head tag. Anyone with write access to MLflow can still edit
or delete a record, but not without `modelyard history --verify` naming it:
- an edited field no longer matches the record's hash (and a new hash is not signed);
- a deleted record leaves the next one pointing at a hash nobody has;
- the newest record deleted leaves the head pointing at a hash nobody has;
- records moved (their start times edited) are listed out of their sequence.

What it cannot see: whoever holds the signing key; and the newest records deleted together with
the head tag rewound to an older record's link (copied from that record). Keep the head that
`history --verify` prints somewhere MLflow's writers cannot reach to catch that too.

Pure functions over tags: `modelyard.deploy.ledger` reads and writes them.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelyard.bundle import key_id, signed_by

SEQ, PREV, HASH, SIGNATURE, KEY = (
    "chain.seq", "chain.prev", "chain.hash", "chain.signature", "chain.key"
)  # fmt: skip
TAGS = (SEQ, PREV, HASH, SIGNATURE, KEY)
GENESIS = "0" * 64  # what the first record of a chain follows


@dataclass(frozen=True)
class Link:
    """A record's place in its chain."""

    seq: int
    prev: str
    hash: str
    signature: str
    key: str  # the signing key's id

    def tags(self) -> dict[str, str]:
        return {SEQ: str(self.seq), PREV: self.prev, HASH: self.hash,
                SIGNATURE: self.signature, KEY: self.key}  # fmt: skip

    def text(self) -> str:
        return json.dumps(self.tags(), sort_keys=True)


@dataclass(frozen=True)
class Entry:
    """One record as the ledger lists it: its fields, its link (None: it has none) and when
    MLflow says it started (what the ledger's order follows)."""

    record_id: str
    fields: Mapping[str, str]
    link: Link | None
    started: int  # ms

    def describe(self) -> str:
        f = self.fields
        seq = f" (seq {self.link.seq})" if self.link else ""
        return (f"{f.get('when', '?')} {f.get('action', '?')} v{f.get('version', '?')}"
                f"{seq}, record {self.record_id}")  # fmt: skip


@dataclass(frozen=True)
class Break:
    entry: Entry | None  # None: the chain's head, not a record
    problem: str

    def describe(self) -> str:
        where = self.entry.describe() if self.entry else "the chain's head"
        return f"{where}: {self.problem}"


def digest(fields: Mapping[str, str], seq: int, prev: str) -> str:
    """The hash a record's link carries: over its fields, its place and what it follows."""
    body = {"fields": dict(fields), "seq": seq, "prev": prev}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def extend(fields: Mapping[str, str], last: Link | None, key: Ed25519PrivateKey) -> Link:
    """The link of a record that follows `last` (None: the chain's first)."""
    seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
    value = digest(fields, seq, prev)
    signature = base64.b64encode(key.sign(value.encode())).decode()
    return Link(seq, prev, value, signature, key_id(key.public_key()))


def parse(tags: Mapping[str, str]) -> Link | None:
    """A record's link from its tags; None when it carries none. Malformed parts are kept as
    they are for `verify` to name (a seq that is not a number reads -1)."""
    if not any(name in tags for name in TAGS):
        return None
    seq = tags.get(SEQ, "")
    return Link(int(seq) if seq.isdigit() else -1, tags.get(PREV, ""), tags.get(HASH, ""),
                tags.get(SIGNATURE, ""), tags.get(KEY, ""))  # fmt: skip


def parse_head(text: str | None) -> Link | None:
    if not text:
        return None
    try:
        return parse(json.loads(text))
    except (ValueError, TypeError, AttributeError):
        return Link(-1, "", "", "", "")


def verify(
    entries: Sequence[Entry], head: Link | None, trusted: Sequence[Ed25519PublicKey]
) -> list[Break]:
    """What is wrong with one chain, earliest first; [] when nothing is. `entries` in any
    order. Records older than the chain (written before modelyard kept one) are left alone;
    a record without a link after the chain began was not written by modelyard."""
    ordered = sorted(entries, key=lambda e: (e.started, e.link.seq if e.link else 0))
    first = next((i for i, e in enumerate(ordered) if e.link is not None), len(ordered))
    chained = ordered[first:]
    hashes = {e.link.hash for e in chained if e.link is not None}
    breaks: list[Break] = []
    highest = 0
    for entry in chained:
        link = entry.link
        if link is None:
            breaks.append(Break(entry, "carries no chain link: added outside modelyard, or "
                                       "its link removed"))  # fmt: skip
            continue
        breaks += _own_breaks(entry, link, trusted)
        if link.seq > 1 and link.prev not in hashes:
            breaks.append(Break(entry, f"the record before it (seq {link.seq - 1}) was deleted "
                                       "or edited: nothing has the hash it follows"))  # fmt: skip
        if link.seq == 1 and link.prev != GENESIS:
            breaks.append(Break(entry, "the first record of its chain follows another"))
        if link.seq < highest:
            breaks.append(Break(entry, f"listed after seq {highest}: reordered (its start time "
                                       "was edited)"))  # fmt: skip
        highest = max(highest, link.seq)
    return breaks + _head_breaks(head, hashes, trusted)


def _own_breaks(entry: Entry, link: Link, trusted: Sequence[Ed25519PublicKey]) -> list[Break]:
    """A record's fields against its own hash, and that hash against its signature."""
    if digest(entry.fields, link.seq, link.prev) != link.hash:
        return [Break(entry, "edited: its fields or its place no longer match its hash")]
    if not _signed(link, trusted):
        return [Break(entry, f"its signature (key {link.key or '?'}) does not verify with any "
                             "trusted key")]  # fmt: skip
    return []


def _head_breaks(
    head: Link | None, hashes: set[str], trusted: Sequence[Ed25519PublicKey]
) -> list[Break]:
    if not hashes:
        return []
    if head is None:
        return [Break(None, "missing: the ledger experiment's head tag was removed")]
    if head.hash not in hashes:
        return [Break(None, f"points at seq {head.seq}, which no record has: the newest "
                            "records were deleted")]  # fmt: skip
    if not _signed(head, trusted):
        return [Break(None, "its signature does not verify with any trusted key")]
    return []


def _signed(link: Link, trusted: Sequence[Ed25519PublicKey]) -> bool:
    try:
        signature = base64.b64decode(link.signature, validate=True)
    except ValueError:
        return False
    return any(signed_by(key, signature, link.hash.encode()) for key in trusted)
