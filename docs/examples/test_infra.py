"""A pytest-testinfra suite, unchanged, run over rexec by the `rexec` connection type.

    pytest docs/examples/test_infra.py --hosts='rexec://lab1,rexec://lab2' --junitxml infra.xml
"""

from __future__ import annotations


def test_hostname_file(host):
    assert host.file("/etc/hostname").exists


def test_root_user(host):
    assert host.user("root").uid == 0


def test_id_runs(host):
    assert host.run("id").rc == 0


def test_shell_package(host):
    assert host.package("bash").is_installed
