"""Host sets: ClusterShell's NodeSet syntax, expanded and folded back (rexec.client.hosts).

The examples are ClusterShell's own (its NodeSet and NodeSetError test suites), where our
semantics agree: expansion is string concatenation with the start's zero padding, and a
folded set expands back to exactly the same hosts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexec.client.hosts import (
    MAX_HOSTS,
    expand_hosts,
    fold_hosts,
    read_hosts_file,
    sort_hosts,
)
from rexec.client.target import load_client_config
from rexec.errors import ConfigError, HostSetError

# (set text, its hosts in set order) -- fold(expand(text)) is `folded` (or text itself)
EXPANSIONS: list[tuple[str, list[str], str | None]] = [
    ("cws-machin", ["cws-machin"], None),
    ("supercluster0", ["supercluster0"], None),
    ("0cluster", ["0cluster"], None),
    ("[0]cluster", ["0cluster"], "0cluster"),
    ("cluster008", ["cluster008"], None),
    ("cluster[115]", ["cluster115"], "cluster115"),
    ("clu-0-3", ["clu-0-3"], None),
    ("clu-0-[3-5]", ["clu-0-3", "clu-0-4", "clu-0-5"], None),
    ("cluster[0-3]", ["cluster0", "cluster1", "cluster2", "cluster3"], None),
    ("cluster[0001-0003]", ["cluster0001", "cluster0002", "cluster0003"], None),
    ("cluster[50-52]-ipmi", ["cluster50-ipmi", "cluster51-ipmi", "cluster52-ipmi"], None),
    (
        "cluster[0001,0002,1555-1557]",
        ["cluster0001", "cluster0002", "cluster1555", "cluster1556", "cluster1557"],
        "cluster[0001-0002,1555-1557]",
    ),
    (" tigrou2 , tigrou7 , tigrou[5,9-11] ", [], "tigrou[2,5,7,9-11]"),
    ("   tigrou2 ,    tigrou5,tigrou7 , tigrou[ 9   - 11 ]    ", [], "tigrou[2,5,7,9-11]"),
    ("cluster115,cluster116,cluster117,cluster130,cluster166", [], "cluster[115-117,130,166]"),
    ("cluster[115-117],cluster130,cluster[166-169],cluster170", [], "cluster[115-117,130,166-170]"),
    ("cluster0,cluster1,cluster,wool,cluster3", [], "cluster,cluster[0-1,3],wool"),
    ("node01[0-1]", ["node010", "node011"], "node[010-011]"),
    ("prod-02[10-20]", [], "prod-[0210-0220]"),
    ("prod-000[1-9]", [], "prod-[0001-0009]"),
    ("prod-100[040-042]", [], "prod-[100040-100042]"),
    ("prod-100[040-042],sysgrp-00[01-02]", [], "prod-[100040-100042],sysgrp-[0001-0002]"),
    ("x01[0-1]y01[0-1]z01[0-1]", [], "x[010-011]y[010-011]z[010-011]"),
    ("x22[0-1]y000z03[0-1]", [], "x[220-221]y000z[030-031]"),
    (
        "acluster41,ccluster12,acluster4,bcluster25,acluster39",
        [],
        "acluster[4,39,41],bcluster25,ccluster12",
    ),
    ("da[2-3]c[0-1]", ["da2c0", "da2c1", "da3c0", "da3c1"], None),
    ("da[2-3]c[1-2],da[3-4]c[1-2]", [], "da[2-4]c[1-2]"),
    ("foo[3-100,200]bar4", [], None),
    ("foo[3-100,102-500]bar[4-30,37]", [], None),
    ("lounge[20-660/2]", [], "*"),  # steps are read, not written
    # set operators, left to right
    (
        " tigrou [1-5] & tigrou [0,2,4] ! tigrou [2-3] ^ tigrou [3-5], tigrou 1 ",
        ["tigrou 1", "tigrou 3", "tigrou 5"],
        "tigrou 1,tigrou 3,tigrou 5",  # names with blanks are kept whole
    ),
    ("cluster[115-117,130,166-170]!cluster[115,130]", [], "cluster[116-117,166-170]"),
    ("cluster[115-117,130,166-170]&cluster[115-167]", [], "cluster[115-117,130,166-167]"),
    ("cluster[115-117,130,166-170]^cluster[115-167]", [], "cluster[118-129,131-165,168-170]"),
    (
        "red[34-55,76-249,300-403],blue,green!red[32-57,72-249,300-341],blue,yellow",
        [],
        "blue,green,red[342-403],yellow",
    ),
    ("artcore[3-999]^artcore[1-2000]", [], "artcore[1-2,1000-2000]"),
    # ours: the forms
    ("lab[01-03]", ["lab01", "lab02", "lab03"], None),
    ("lab[1-3,7]", ["lab1", "lab2", "lab3", "lab7"], None),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"], None),
    ("127.0.1.[1-3]:9000", ["127.0.1.1:9000", "127.0.1.2:9000", "127.0.1.3:9000"], None),
    ("lab1,lab2,10.0.0.7:8300", ["10.0.0.7:8300", "lab1", "lab2"], "10.0.0.7:8300,lab[1-2]"),
    ("[::1]:8222,[::1]:8223", ["[::1]:8222", "[::1]:8223"], None),
    ("lab[1-10/3]", ["lab1", "lab4", "lab7", "lab10"], "lab[1,4,7,10]"),
    ("lab[08-10]", ["lab08", "lab09", "lab10"], None),
    ("lab[098-100]", ["lab098", "lab099", "lab100"], None),
    ("lab[8-10]", ["lab8", "lab9", "lab10"], None),
    ("lab[1-2],lab[01-02]", ["lab01", "lab1", "lab02", "lab2"], "lab[1-2,01-02]"),
]


@pytest.mark.parametrize(("text", "hosts", "folded"), EXPANSIONS)
def test_expand_and_fold_round_trip(text: str, hosts: list[str], folded: str | None) -> None:
    expanded = expand_hosts(text)
    if hosts:
        assert expanded == hosts
    assert len(expanded) == len(set(expanded))
    fold = fold_hosts(expanded)
    if folded != "*":
        assert fold == (folded if folded is not None else text)
    assert expand_hosts(fold) == expanded  # the fold names exactly the same hosts
    assert fold_hosts(reversed(expanded)) == fold  # order of input does not matter


def test_clustershell_counts() -> None:
    assert len(expand_hosts("cluster[0034-8127]")) == 8094
    assert expand_hosts("cluster[0034-8127]")[0] == "cluster0034"
    assert (
        len(expand_hosts("roma[50-99]-ipmi,cors[113,115-117,130,166-172],cws-tigrou,tigrou3")) == 64
    )
    assert len(expand_hosts("red[34-55,76-249,300-403],blue,green")) == 302
    assert len(expand_hosts("tronic[0036-1630]c[3-4]")) == 3190
    assert expand_hosts(
        "tigrou [1-5] & tigrou [0,2,4] ! tigrou [2-3] ^ tigrou [3-5], tigrou 1"
    ) == [
        "tigrou 1",
        "tigrou 3",
        "tigrou 5",
    ]


def test_nd_folds_to_a_product() -> None:
    hosts = [f"rack{r}-node{n:02d}" for r in (1, 2, 3) for n in range(1, 41)]
    assert fold_hosts(hosts) == "rack[1-3]-node[01-40]"
    ips = [f"127.0.{a}.{b}:9000" for a in range(1, 5) for b in range(1, 251)]
    assert fold_hosts(ips) == "127.0.[1-4].[1-250]:9000"
    ragged = expand_hosts("da[2-3]c[1-2],da[3-4]c[2-3]")
    assert sorted(fold_hosts(ragged).split(",")) == ["da2c[1-2]", "da3c[1-3]", "da4c[2-3]"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no hosts"),
        ("nova[]", "empty range"),
        ("nova[-]", "bad range '-'"),
        ("nova[A]", "bad range 'A'"),
        ("nova[2-5/a]", "bad step in '2-5/a'"),
        ("nova[3/2]", "bad step in '3/2'"),
        ("nova[3-/2]", "bad range '3-/2'"),
        ("nova[-3/2]", "bad range '-3/2'"),
        ("nova[4-3/2]", "reversed range '4-3/2'"),
        ("nova[4-5/-2]", "bad step in '4-5/-2'"),
        ("nova[004-002]", "reversed range '004-002'"),
        ("lab[3-1]", "reversed range '3-1'"),
        ("nova[3-59/2,102a]", "bad range '102a'"),
        ("nova[3-59/2,,102]", "bad range ''"),
        ("nova[3-59/2,102", "'[' without ']'"),
        ("nova3,nova4,,nova6", "an empty name or a stray operator"),
        ("nova6,", "an empty name or a stray operator"),
        ("nova6]", "']' without '['"),
        ("n6[1-4]]", "']' without '['"),
        ("n[1-4]0[3-4]", "ranges must be separated by a non-digit"),
        ("n6[1-4][3-4]", "ranges must be separated by a non-digit"),
        ("xa[[zer[1-30]p[4-9]", "nested '['"),
        ("foo!", "stray operator"),
        ("!foo", "stray operator"),
        ("&", "stray operator"),
        ("lab[1-010]", "inconsistent zero padding in '1-010'"),
    ],
)
def test_malformed_sets_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(HostSetError) as info:
        expand_hosts(text, groups={})
    assert message in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_expansion_is_bounded() -> None:
    assert len(expand_hosts("n[1-10]", limit=10)) == 10
    with pytest.raises(HostSetError, match="more than 10 hosts"):
        expand_hosts("n[1-11]", limit=10)
    with pytest.raises(HostSetError, match=rf"has more than {MAX_HOSTS} hosts"):
        expand_hosts("n[1-1000000000]")  # refused before any name is built
    with pytest.raises(HostSetError, match="more than 10 hosts"):
        expand_hosts("a[1-6]b[1-2]", limit=10)
    with pytest.raises(HostSetError, match="more than 10 hosts"):
        expand_hosts("a[1-6],b[1-6]", limit=10)


def test_sort_order_is_numeric_within_a_pattern() -> None:
    assert sort_hosts(["lab10", "lab9", "db1", "lab", "lab09"]) == [
        "db1",
        "lab",
        "lab09",
        "lab9",
        "lab10",
    ]


# ---- groups ------------------------------------------------------------------------------


def test_groups_expand_nest_and_combine() -> None:
    groups = {"lab": ["lab[01-04]", "gpu1"], "all": ["@lab", "db[1-2]"], "bad": ["x[2-1]"]}
    assert expand_hosts("@lab", groups=groups) == ["gpu1", "lab01", "lab02", "lab03", "lab04"]
    assert expand_hosts("@all!@lab", groups=groups) == ["db1", "db2"]
    assert expand_hosts("@lab&lab[03-09]", groups=groups) == ["lab03", "lab04"]
    with pytest.raises(HostSetError, match=r"unknown group @nope \(groups: all, bad, lab\)"):
        expand_hosts("@nope", groups=groups)
    with pytest.raises(HostSetError, match=r"^f\.toml: groups\.bad: invalid host set 'x\[2-1\]'"):
        expand_hosts("@bad", groups=groups, where="f.toml")
    loop = {"a": ["@b"], "b": ["x1", "@a"]}
    with pytest.raises(
        HostSetError, match=r"groups\.a: a group that contains itself: @a -> @b -> @a"
    ):
        expand_hosts("@a", groups=loop)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(text)
    return path


def test_groups_in_the_client_config(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[groups]\nlab = ["lab[01-40]", "gpu1"]\ngpu = "gpu[1-4]"\n'
        '[groups.sec]\nhosts = ["s[1-2]"]\ntoken_file = "sec.token"\n',
    )
    config = load_client_config(path, env={"HOME": str(tmp_path)})
    assert config.groups["lab"].hosts == ("lab[01-40]", "gpu1")
    assert config.groups["gpu"].hosts == ("gpu[1-4]",)
    assert config.groups["lab"].token_file is None
    assert config.groups["sec"].token_file == tmp_path / "sec.token"
    # rexec.expand_hosts reads the groups of the client config when none are given
    import os

    old = os.environ.get("REXEC_CONFIG")
    os.environ["REXEC_CONFIG"] = str(path)
    try:
        assert len(expand_hosts("@lab")) == 41
        with pytest.raises(
            HostSetError, match=rf"unknown group @x in {path} \(groups: gpu, lab, sec\)"
        ):
            expand_hosts("@x")
    finally:
        if old is None:
            del os.environ["REXEC_CONFIG"]
        else:
            os.environ["REXEC_CONFIG"] = old


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups = 3\n", "groups: must be a table"),
        ('[groups]\n"a b" = ["x"]\n', "groups.a b: group names may use only"),
        ("[groups]\nlab = []\n", "groups.lab: must be a host set string or a non-empty list"),
        ("[groups]\nlab = [1]\n", "groups.lab: must be a host set string or a non-empty list"),
        ('[groups]\nlab = ""\n', "groups.lab: must be a host set string or a non-empty list"),
        ('[groups.lab]\ntoken_file = "t"\n', "groups.lab.hosts: missing key"),
        ('[groups.lab]\nhosts = "a"\nport = 1\n', "unknown key 'groups.lab.port'"),
        (
            '[groups.lab]\nhosts = "a"\ntoken_file = 3\n',
            "groups.lab.token_file: must be a non-empty string",
        ),
    ],
)
def test_bad_groups_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_client_config(path, env={"HOME": str(tmp_path)})
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_hosts_file_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("# failed last time\nlab[01-03]\n\nlab07  # flaky\ndb1,db2\n")
    assert read_hosts_file(str(path)) == ["db1", "db2", "lab01", "lab02", "lab03", "lab07"]
    path.write_text("lab[01-03]\nlab[5-4]\n")
    with pytest.raises(HostSetError, match=r"hosts, line 2: invalid host set 'lab\[5-4\]'"):
        read_hosts_file(str(path))
    with pytest.raises(HostSetError, match="no-such: No such file"):
        read_hosts_file(str(tmp_path / "no-such"))


# ---- property-style round trips -------------------------------------------------------------

_number = st.integers(min_value=0, max_value=300).flatmap(
    lambda n: st.sampled_from([str(n), str(n).zfill(2), str(n).zfill(3), str(n).zfill(4)])
)
_host = st.one_of(
    st.tuples(st.sampled_from(["lab", "n", "gpu-", "x"]), _number).map("".join),
    st.tuples(st.sampled_from(["rack", "r"]), _number, st.just("-node"), _number).map("".join),
    st.tuples(st.just("127.0."), _number, st.just("."), _number, st.just(":9000")).map("".join),
    st.sampled_from(["db", "web", "[::1]:8222", "unix:/run/a.sock"]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_host, min_size=1, max_size=60))
def test_fold_then_expand_is_the_same_set(hosts: list[str]) -> None:
    folded = fold_hosts(hosts)
    assert expand_hosts(folded) == sort_hosts(hosts)
    assert fold_hosts(expand_hosts(folded)) == folded
    assert folded.count(",") <= len(set(hosts)) - 1


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["lab", "n", "c-"]),
    st.integers(min_value=0, max_value=500),
    st.integers(min_value=0, max_value=60),
    st.integers(min_value=0, max_value=4),
)
def test_expand_a_range_then_fold_is_the_range(
    prefix: str, start: int, span: int, pad: int
) -> None:
    first, last = str(start).zfill(pad), str(start + span).zfill(pad)
    if len(last) > len(first) and len(first) == pad and first.startswith("0"):
        last = str(start + span)  # the padding of a range is its start's
    text = f"{prefix}[{first}-{last}]" if span else f"{prefix}{first}"
    hosts = expand_hosts(text)
    assert len(hosts) == span + 1
    assert fold_hosts(hosts) == text
