"""Config reload in the router (RLD-3/RLD-4): unchanged models keep running, changed ones
drain and restart, removed ones stop, added ones appear."""
from __future__ import annotations

from llamaswap.errors import ModelNotFound
from llamaswap.observe import Removed, Stopping
from tests.factories import make_config
from tests.test_router import RouterCase, m


class ReconfigureTests(RouterCase):
    def setUp(self) -> None:
        groups_free = {}
        self.build([m("a"), m("b")], groups=groups_free)

    def reload(self, models, **kw):
        return self.router.reconfigure(make_config(models, **kw))

    def test_outcome_lists(self):
        """RLD-5: added, removed, changed and unchanged are reported by id."""
        outcome = self.reload([m("a"), m("b", proxy="http://127.0.0.1:5999"), m("c")])
        self.assertEqual(outcome, {"added": ["c"], "removed": [], "changed": ["b"], "unchanged": ["a"]})

    def test_unchanged_model_keeps_child_and_inflight(self):
        """An unchanged running model keeps its pid and its in-flight request."""
        lease = self.serve("a")
        pid = self.router.process("a").pid
        outcome = self.reload([m("a", ttl=50, name="renamed"), m("b")])
        self.assertEqual(outcome["unchanged"], ["a", "b"])
        proc = self.router.process("a")
        self.assertEqual((proc.pid, proc.state.value), (pid, "ready"))
        self.assertEqual(proc.model.name, "renamed")  # display fields apply at once
        self.assertEqual(self.terms("a"), [])
        lease.release()
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_changed_model_drains_then_restarts(self):
        """A changed busy model finishes its request, then restarts with the new config."""
        lease = self.serve("a")
        old_pid = self.router.process("a").pid
        self.reload([m("a", argv=("/bin/true", "--new")), m("b")])
        self.assertEqual(self.terms("a"), [])  # never while in flight (SCHED-6)
        waiting = self.router.acquire("a")  # new requests wait for the new child
        self.settle()
        self.assertNoResult(waiting)
        lease.release()
        self.settle()
        self.assertEqual(len(self.terms("a")), 1)
        self.settle()
        proc = self.router.process("a")
        self.assertEqual(proc.model.argv, ("/bin/true", "--new"))
        self.assertEqual(proc.state.value, "starting")
        self.assertNotEqual(proc.pid, old_pid)
        self.ready("a")
        self.successResultOf(waiting).release()
        self.assertIn(Stopping("a", "reload"), self.emitted)

    def test_changed_stopped_model_starts_on_next_request_only(self):
        """A changed model that was not running is not started by the reload."""
        self.reload([m("a", argv=("/bin/true",)), m("b")])
        self.settle()
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.router.process("a").model.argv, ("/bin/true",))

    def test_removed_model_stops_and_waiters_get_404(self):
        """A removed model stops once idle; its waiters get model_not_found."""
        self.serve("a").release()
        waiting = self.router.acquire("b")  # b needs a's slot: it waits for the swap
        self.reload([m("a")])
        self.failureResultOf(waiting, ModelNotFound)
        self.settle()
        self.assertIn(Removed("b"), self.emitted)
        self.assertNotIn("b", [p.id for p in self.router.processes()])
        self.failureResultOf(self.router.acquire("b"), ModelNotFound)

    def test_removed_busy_model_finishes_request_first(self):
        """A removed busy model is stopped only after its in-flight request."""
        lease = self.serve("a")
        self.reload([m("b")])
        self.settle()
        self.assertEqual(self.terms("a"), [])
        lease.release()
        self.settle()
        self.assertEqual(len(self.terms("a")), 1)
        self.assertIn(Removed("a"), self.emitted)

    def test_added_model_is_requestable(self):
        """An added model starts stopped and serves its first request."""
        self.reload([m("a"), m("b"), m("c")])
        self.assertEqual(self.state("c"), "stopped")
        self.serve("c").release()
        self.assertEqual(self.state("c"), "ready")
        self.router.unload()
        self.settle()
