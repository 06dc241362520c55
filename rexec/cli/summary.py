"""The one summary line on stderr that ends a run on a host set, for `rexec run` and
`rexec cp` alike: `40 hosts: 37 ok, 1 exit 2 (lab07), 1 timeout (lab12), 1 unreachable
(lab40)`. Hosts are counted per label, the labels in rexec.client.fanout.STATUSES's order,
each failed label's hosts folded (rexec.fold_hosts).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from rexec.client.fanout import STATUSES, Status
from rexec.client.hosts import fold_hosts

if TYPE_CHECKING:
    from rexec.client.fleet import HostResult

SUMMARY_HOSTS = 160  # characters of folded host names per summary entry
_RANK = {status: i for i, status in enumerate(STATUSES)}

# One host's place in the summary: (host, status, number, label); `number` orders the labels
# of one status (`exit 1` before `exit 2`), `label` is what the line says (`ok` for success).
Entry = tuple[str, Status, int, str]


def host_entry(r: HostResult) -> Entry:
    """A host of `rexec run`, or one that failed as a whole (rexec.client.fleet.failed_host):
    `ok`, `exit N`, `signal N`, `timeout`, `unreachable`, `auth_failed`, an error's kind."""
    number = r.exit_code if r.status == "exit" else r.signal if r.status == "signal" else 0
    return (r.host, r.status, number or 0, "ok" if r.ok else r.label)


def summary_line(entries: Iterable[Entry], missing: int = 0) -> str:
    """`40 hosts: 37 ok, 1 exit 2 (lab07), ...`; `missing`: hosts that never finished (the
    run was interrupted), counted in the total and said at the end."""
    by_label: dict[tuple[int, int, str], list[str]] = {}
    count = missing
    for host, status, number, label in entries:
        by_label.setdefault((_RANK[status], number, label), []).append(host)
        count += 1
    parts = []
    for (_, _, label), hosts in sorted(by_label.items()):
        if label == "ok":
            parts.append(f"{len(hosts)} ok")
            continue
        folded = fold_hosts(hosts)
        if len(folded) > SUMMARY_HOSTS:
            folded = folded[: SUMMARY_HOSTS - 3] + "..."
        parts.append(f"{len(hosts)} {label} ({folded})")
    line = f"{count} host{'s' if count != 1 else ''}:"
    if parts:
        line += " " + ", ".join(parts)
    if missing:
        line += f" ({missing} not finished: interrupted)"
    return line
