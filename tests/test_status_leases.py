"""`status` shows every lease of every instance (whose it is, bound or
detached, when it expires, which process holds it) and why an exited instance
ended, against the real daemon; a token in full only to its own uid and root."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests import test_daemon_protocol
from tests.conftest import eventually, read_pidfile, tree_adapter
from tests.test_daemon_protocol import (
    NOBODY,
    STOP_TIMEOUT,
    TREE_ROLES,
    Connection,
    run_as_nobody,
    start_public_daemon,
)

# A directory uid 65534 can reach (a fixture).
public_dir = test_daemon_protocol.public_dir


def leases_of(connection: Connection, job: str) -> dict[str, dict[str, object]]:
    """The leases `status` lists for the one instance of `job`, by token."""
    (instance,) = connection.result("status", {"job": job})["instances"]
    return {lease["lease"]: lease for lease in instance["leases"]}


def test_status_lists_bound_and_detached_leases_with_their_holders(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(tree_adapter("tree", pidfile=tmp_path / "t.pids", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT))
    with Connection(daemon.socket) as holder, Connection(daemon.socket) as observer:
        bound = holder.result("acquire", {"job": "j", "adapter": "tree"})
        detached = holder.result("acquire", {"job": "j", "adapter": "tree", "detach": True, "ttl": 60})
        with Connection(daemon.socket) as gone:
            orphaned = gone.result("acquire", {"job": "j", "adapter": "tree", "detach": True, "ttl": 120})
        before = time.time()

        def settled() -> dict[str, dict[str, object]] | None:
            # The closed connection's lease loses its holder once the daemon saw it close.
            leases = leases_of(observer, "j")
            return leases if leases[orphaned["lease"]]["pid"] is None else None

        leases = eventually(settled)
        assert leases, leases_of(observer, "j")
        assert set(leases) == {bound["lease"], detached["lease"], orphaned["lease"]}
        assert leases[bound["lease"]] == {"lease": bound["lease"], "detached": False, "expires_at": None, "uid": 0, "pid": os.getpid()}
        assert leases[detached["lease"]]["detached"] is True and leases[detached["lease"]]["pid"] == os.getpid()
        assert leases[detached["lease"]]["expires_at"] == detached["expires_at"]
        assert before + 100 < leases[orphaned["lease"]]["expires_at"] <= before + 120
        assert leases[orphaned["lease"]]["pid"] is None and leases[orphaned["lease"]]["uid"] == 0
        # A release takes the lease off the list.
        holder.result("release", {"lease": detached["lease"]})
        assert set(leases_of(observer, "j")) == {bound["lease"], orphaned["lease"]}
        holder.result("release_job", {"job": "j"})


def test_another_uid_sees_only_the_first_8_characters_of_a_token(start_daemon, public_dir: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "t.pids"
    adapters = tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    daemon = start_public_daemon(start_daemon, public_dir, adapters, allowed_uids=[NOBODY])
    with Connection(daemon.socket) as root:
        # uid 65534 spawns the instance; root may join any instance.
        (acquired,) = run_as_nobody(
            daemon.socket, [("acquire", {"job": "shared-job", "adapter": "tree", "detach": True, "ttl": 60})]
        )["responses"]
        own = acquired["result"]["lease"]
        held = root.result("acquire", {"job": "shared-job", "adapter": "tree"})
        (status,) = run_as_nobody(daemon.socket, [("status", {"job": "shared-job"})])["responses"]
        (instance,) = status["result"]["instances"]
        seen = {lease["uid"]: lease for lease in instance["leases"]}
        assert seen[0]["lease"] == held["lease"][:8] and len(held["lease"]) > 8
        assert seen[NOBODY]["lease"] == own
        # Root sees every token whole.
        assert set(leases_of(root, "shared-job")) == {held["lease"], own}
        root.result("release_job", {"job": "shared-job"})


def test_another_uid_can_neither_join_an_instance_nor_read_its_logs(start_daemon, public_dir: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "t.pids"
    adapters = tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    daemon = start_public_daemon(start_daemon, public_dir, adapters, allowed_uids=[NOBODY])
    with Connection(daemon.socket) as root:
        held = root.result("acquire", {"job": "root-job", "adapter": "tree"})
        join, by_instance, by_lease = run_as_nobody(daemon.socket, [
            ("acquire", {"job": "root-job", "adapter": "tree"}),
            ("logs", {"instance": held["instance"]}),
            ("logs", {"lease": held["lease"]}),
        ])["responses"]
        for refused in (join, by_instance, by_lease):
            assert refused["error"]["code"] == 1005, refused
        assert "belongs to uid 0" in join["error"]["message"]
        (instance,) = [i for i in root.result("status", {})["instances"] if i["job"] == "root-job"]
        assert instance["refcount"] == 1  # the refused join left nothing behind
        root.result("release_job", {"job": "root-job"})


def test_an_exited_instance_says_why_and_with_what_status(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "t.pids"
    daemon = start_daemon(
        tree_adapter("brief", pidfile=pidfile, args=("--no-escapee", "--exit-after", "0.3"), stop_timeout=STOP_TIMEOUT)
        + tree_adapter("steady", pidfile=tmp_path / "s.pids", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    )
    with Connection(daemon.socket) as holder:
        lease = holder.result("acquire", {"job": "j", "adapter": "brief"})["lease"]
        read_pidfile(pidfile, roles=TREE_ROLES)

        def exited() -> dict[str, object] | None:
            (instance,) = holder.result("status", {"job": "j"})["instances"]
            return instance if instance["state"] == "exited" else None

        instance = eventually(exited, timeout=10.0)
        assert instance, holder.result("status", {"job": "j"})
        assert instance["returncode"] == 3 and instance["reason"] == "exited"
        assert [held["lease"] for held in instance["leases"]] == [lease]
        holder.result("release", {"lease": lease})
        # A running instance carries neither.
        running = holder.result("acquire", {"job": "j2", "adapter": "steady"})
        (row,) = holder.result("status", {"job": "j2"})["instances"]
        assert "returncode" not in row and "reason" not in row
        holder.result("release", {"lease": running["lease"]})


def test_status_filters_by_job_adapter_state_and_owner(start_daemon, public_dir: Path, tmp_path: Path) -> None:
    adapters = (
        tree_adapter("tree", pidfile=tmp_path / "t.pids", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
        + '[adapters.brief]\ncommand = ["/bin/true"]\nstop_timeout = 0.5\n'
    )
    daemon = start_public_daemon(start_daemon, public_dir, adapters, allowed_uids=[NOBODY])
    with Connection(daemon.socket) as root:
        root.result("acquire", {"job": "a", "adapter": "tree"})
        root.result("acquire", {"job": "b", "adapter": "tree"})
        root.result("acquire", {"job": "a", "adapter": "brief"})  # exits at once, stays listed as exited
        run_as_nobody(daemon.socket, [("acquire", {"job": "n", "adapter": "tree", "detach": True, "ttl": 60})])

        def jobs(**filters: object) -> list[tuple[str, str]]:
            rows = root.result("status", filters)["instances"]
            return sorted((row["job"], row["adapter"]) for row in rows)

        assert eventually(lambda: jobs(state="exited") == [("a", "brief")], timeout=5)
        assert jobs(job="a") == [("a", "brief"), ("a", "tree")]
        assert jobs(adapter="tree") == [("a", "tree"), ("b", "tree"), ("n", "tree")]
        assert jobs(job="a", adapter="tree") == [("a", "tree")]
        assert jobs(state="running", uid=0) == [("a", "tree"), ("b", "tree")]
        assert jobs(uid=NOBODY) == [("n", "tree")]
        assert {row["uid"] for row in root.result("status", {"uid": NOBODY})["instances"]} == {NOBODY}
        assert jobs(adapter="nope") == []
        status = root.result("status", {"job": "a"})
        assert status["daemon"]["instances"] == 4  # the counts are of everything
        for bad in ({"state": "sleeping"}, {"uid": -1}):
            refused = root.call("status", bad)
            assert refused["error"]["code"] == -32602, refused
        root.result("release_job", {"job": "a"})
        root.result("release_job", {"job": "b"})
        root.result("release_job", {"job": "n"})
