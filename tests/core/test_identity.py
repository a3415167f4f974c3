"""The identity keys of an adapter (`user`, `group`, `umask`, `limits`,
`no_new_privileges`): what the loader resolves, and every error naming the
file, the key and what was expected. A daemon's own uid and gid are given
explicitly (`daemon_ids`) to check what a non-root daemon may name."""

from __future__ import annotations

import os
import pwd
import resource
import subprocess

import pytest

from supervisor.core.config import check_config, parse_config
from supervisor.core.errors import ConfigError
from supervisor.core.identity import PEER, Credentials, Limit, credentials_of, user_environment
from tests import users
from tests.users import SystemUser

PATH = "/etc/adapter-supervisor/supervisor.toml"
NOBODY = pwd.getpwnam("nobody")
ROOT_IDS = (0, 0)

# The fixtures, under the names the tests take them by.
test_user = users.test_user


def adapter(lines: str, daemon_ids: tuple[int, int] = ROOT_IDS):
    config = check_config(f'[adapters.a]\ncommand = ["/bin/true"]\n{lines}\n', PATH, daemon_ids=daemon_ids)
    assert not config.errors, config.errors
    assert config.config is not None
    return config.config.adapters["a"]


def error(lines: str, daemon_ids: tuple[int, int] = ROOT_IDS) -> ConfigError:
    checked = check_config(f'[adapters.a]\ncommand = ["/bin/true"]\n{lines}\n', PATH, daemon_ids=daemon_ids)
    assert checked.config is None and len(checked.errors) == 1, checked.errors
    return checked.errors[0]


def test_without_identity_keys_the_tree_runs_as_the_daemon_with_no_new_privileges() -> None:
    plain = adapter("")
    assert (plain.user, plain.credentials, plain.umask, plain.limits) == (None, None, None, ())
    assert plain.no_new_privileges is True
    assert plain.child_setup().no_new_privs is True
    assert adapter("no_new_privileges = false").child_setup().no_new_privs is False


def test_a_user_name_resolves_at_load_with_its_passwd_entry() -> None:
    nobody = adapter('user = "nobody"')
    assert nobody.user == "nobody"
    assert nobody.credentials == Credentials(
        uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, groups=tuple(dict.fromkeys([NOBODY.pw_gid, *os.getgrouplist("nobody", NOBODY.pw_gid)])),
        name="nobody", home=NOBODY.pw_dir,
    )
    # A uid (number or decimal string) names the same user.
    assert adapter(f"user = {NOBODY.pw_uid}").credentials == nobody.credentials
    assert adapter(f'user = "{NOBODY.pw_uid}"').credentials == nobody.credentials


def test_the_users_supplementary_groups_come_with_it(test_user: SystemUser) -> None:
    config = adapter(f'user = "{test_user.name}"')
    assert config.credentials is not None
    assert config.credentials.gid == test_user.gid
    assert set(config.credentials.groups) == {test_user.gid, test_user.extra_gid}
    # `group` replaces the primary group, as initgroups(user, group) does:
    # the supplementary groups are those the group database lists the user in.
    grouped = adapter(f'user = "{test_user.name}"\ngroup = "{test_user.extra_group}"')
    assert grouped.credentials is not None and grouped.credentials.gid == test_user.extra_gid
    assert set(grouped.credentials.groups) == {test_user.extra_gid}


def test_a_uid_without_passwd_entry_needs_a_group_and_gets_systemds_environment() -> None:
    uid = 61999
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    assert "no passwd entry" in str(error(f"user = {uid}"))
    homeless = adapter(f"user = {uid}\ngroup = 61998")
    assert homeless.credentials == Credentials(uid=uid, gid=61998, groups=(61998,))
    assert homeless.credentials.environment() == {"HOME": "/", "USER": str(uid), "LOGNAME": str(uid)}


def test_peer_is_resolved_per_acquire_not_at_load() -> None:
    peer = adapter(f'user = "{PEER}"')
    assert peer.runs_as_peer and peer.user == PEER and peer.credentials is None
    them = credentials_of(NOBODY.pw_uid, NOBODY.pw_gid)
    assert peer.child_setup(them).credentials == them
    # A fixed user ignores who acquired.
    assert adapter('user = "nobody"').child_setup(credentials_of(0)).credentials.uid == NOBODY.pw_uid


@pytest.mark.parametrize(
    ("lines", "key", "expected"),
    [
        ('user = "no-such-user-here"', "adapters.a.user", 'a user that exists on this host (create it with useradd, or give its uid), got "no-such-user-here"'),
        ('user = "nobody"\ngroup = "no-such-group-here"', "adapters.a.group", "a group that exists on this host"),
        ('user = ""', "adapters.a.user", 'a user name, a uid or "@peer"'),
        ('user = "@someone"', "adapters.a.user", 'a user name, a uid or "@peer"'),
        ("user = -1", "adapters.a.user", "an integer >= 0"),
        ('group = "root"', "adapters.a.group", "expected `user` beside it"),
        ('user = "@peer"\ngroup = "root"', "adapters.a.group", "no group with user = \"@peer\""),
        ('umask = "999"', "adapters.a.umask", 'an octal umask from "0000" to "0777" such as "0077", got "999"'),
        ('umask = "01777"', "adapters.a.umask", "an octal umask"),
        ("umask = 77", "adapters.a.umask", "an octal umask"),
        ("limits = { files = 10 }", "adapters.a.limits.files", "one of the limits as, core, cpu,"),
        ('limits = { nofile = "4k" }', "adapters.a.limits.nofile", 'a whole number or "unlimited", got "4k"'),
        ("limits = { nofile = -1 }", "adapters.a.limits.nofile", 'a whole number or "unlimited", got -1'),
        ("limits = { nofile = 1.5 }", "adapters.a.limits.nofile", "got 1.5"),
        ("limits = { core = true }", "adapters.a.limits.core", 'a whole number, a size such as "512MiB", or "unlimited", got true'),
        ('limits = { stack = "8 parsecs" }', "adapters.a.limits.stack", "a size such as"),
        ("limits = { cpu = 18446744073709551615 }", "adapters.a.limits.cpu", "at most 18446744073709551614"),
        ("limits = 4096", "adapters.a.limits", "a table"),
        ('no_new_privileges = "yes"', "adapters.a.no_new_privileges", "a boolean"),
    ],
)
def test_bad_identity_keys_name_the_file_the_key_and_what_was_expected(lines: str, key: str, expected: str) -> None:
    found = error(lines)
    assert (found.path, found.key) == (PATH, key)
    assert expected in found.expected


def test_limits_take_numbers_unlimited_and_for_byte_limits_sizes() -> None:
    limits = adapter('limits = { nofile = 4096, core = 0, as = "1GiB", stack = "8M", cpu = "unlimited" }').limits
    assert limits == (
        Limit("nofile", resource.RLIMIT_NOFILE, 4096),
        Limit("core", resource.RLIMIT_CORE, 0),
        Limit("as", resource.RLIMIT_AS, 2**30),
        Limit("stack", resource.RLIMIT_STACK, 8 * 2**20),
        Limit("cpu", resource.RLIMIT_CPU, resource.RLIM_INFINITY),
    )
    assert adapter('umask = "0077"').umask == 0o077
    assert adapter('umask = "0o027"').umask == 0o027


def test_a_daemon_that_is_not_root_may_name_only_its_own_user_and_group() -> None:
    ids = (NOBODY.pw_uid, NOBODY.pw_gid)
    found = error('user = "root"', daemon_ids=ids)
    assert found.key == "adapters.a.user"
    assert f"expected the daemon's own user (uid {NOBODY.pw_uid})" in found.expected and "(uid 0)" in found.expected
    found = error('user = "nobody"\ngroup = 0', daemon_ids=ids)
    assert found.key == "adapters.a.group" and f"the daemon's own group (gid {NOBODY.pw_gid})" in found.expected
    # Its own user, and "@peer" (judged per acquire), are fine.
    assert adapter('user = "nobody"', daemon_ids=ids).credentials.uid == NOBODY.pw_uid
    assert adapter('user = "@peer"', daemon_ids=ids).runs_as_peer
    # Root may name anyone.
    assert adapter('user = "nobody"', daemon_ids=ROOT_IDS).credentials.uid == NOBODY.pw_uid


def test_a_reload_resolves_names_again(test_user: SystemUser) -> None:
    text = f'[adapters.a]\ncommand = ["/bin/true"]\nuser = "{test_user.name}"\n'
    assert parse_config(text).adapters["a"].credentials.uid == test_user.uid
    free_uid = next(uid for uid in range(61900, 62000) if not _uid_taken(uid))
    subprocess.run(["usermod", "--uid", str(free_uid), test_user.name], check=True, capture_output=True)
    assert parse_config(text).adapters["a"].credentials.uid == free_uid


def _uid_taken(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_user_variables_follow_the_user_unless_the_adapter_sets_them() -> None:
    nobody = credentials_of(NOBODY.pw_uid)
    env = user_environment({"HOME": "/root", "USER": "root", "LOGNAME": "root", "PATH": "/bin"}, nobody, {"HOME": "/srv"})
    assert env == {"HOME": "/root", "USER": "nobody", "LOGNAME": "nobody", "PATH": "/bin"}
