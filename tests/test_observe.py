"""llamaswap.observe: delivery of typed model events to observers."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.observe import Observers, QueueChanged, StateChanged
from tests.fakes import capture_logger


class ObserversTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log_events: list = []
        self.observers = Observers(capture_logger(self.log_events))

    def test_in_order_to_every_observer(self):
        """Each event goes to every observer, in the order they were added."""
        seen: list = []
        self.observers.add(lambda e: seen.append(("first", e)))
        self.observers.add(lambda e: seen.append(("second", e)))
        event = StateChanged("a", "stopped", "starting")
        self.observers.publish(event)
        self.assertEqual(seen, [("first", event), ("second", event)])

    def test_empty_is_false(self):
        """``if observers:`` lets a publisher skip building events nobody wants."""
        self.assertFalse(self.observers)
        self.observers.add(print)
        self.assertTrue(self.observers)

    def test_remove_during_delivery(self):
        """An observer may remove itself while an event is delivered; the others still get it."""
        seen: list = []

        def once(event):
            seen.append("once")
            self.observers.remove(once)

        self.observers.add(once)
        self.observers.add(lambda e: seen.append("always"))
        self.observers.publish(QueueChanged("a", 0, 1))
        self.observers.publish(QueueChanged("a", 0, 0))
        self.assertEqual(seen, ["once", "always", "always"])
        self.observers.remove(once)  # unknown: ignored

    def test_failure_logged(self):
        """An observer that raises is logged with the event; the next one still observes."""
        seen: list = []

        def broken(event):
            raise ValueError("bug")

        self.observers.add(broken)
        self.observers.add(seen.append)
        self.observers.publish(QueueChanged("a", 1, 0))
        self.assertEqual(seen, [QueueChanged("a", 1, 0)])
        [logged] = self.log_events
        self.assertTrue(logged["log_failure"].check(ValueError))
        self.assertEqual(logged["event"], QueueChanged("a", 1, 0))


class QueueObserverTests(SynchronousTestCase):
    def test_queue_changed_only_to_those_added_for_it(self):
        from llamaswap.observe import Observers, QueueChanged, Removed

        observers = Observers()
        everything, others = [], []
        observers.add(everything.append)
        observers.add(others.append, queue=False)
        observers.publish(QueueChanged("m", 1, 0))
        observers.publish(Removed("m"))
        self.assertEqual([type(e) for e in everything], [QueueChanged, Removed])
        self.assertEqual([type(e) for e in others], [Removed])
        observers.remove(everything.append)
        observers.publish(QueueChanged("m", 0, 0))
        self.assertEqual(len(everything), 2)
