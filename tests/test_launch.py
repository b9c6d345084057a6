"""ikport/launch.py on the CPU: the per-stream split-K scratch is reused, grows stream-ordered
(the old buffer freed on the same stream, after the new one is taken) and is keyed by stream."""

from __future__ import annotations

import pytest

from ikport import launch


class FakeBackend:
    def __init__(self) -> None:
        self.next_ptr = 0x1000
        self.log: list[tuple] = []

    def alloc_async(self, device: int, nbytes: int, stream: int) -> int:
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + nbytes
        self.log.append(("alloc", device, nbytes, stream, ptr))
        return ptr

    def free_async(self, ptr: int, stream: int) -> None:
        self.log.append(("free", ptr, stream))


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(launch, "_scratch", {})
    monkeypatch.setattr(launch, "capturing", lambda: False)


def test_scratch_is_reused_then_grows_stream_ordered(fresh):
    b = FakeBackend()
    p1, owner = launch.split_scratch(b, 0, 7, 1000)
    assert owner is None and b.log == [("alloc", 0, 1 << 18, 7, p1)]  # a floor of 256 KB
    assert launch.split_scratch(b, 0, 7, 1 << 18) == (p1, None)  # fits: no new allocation
    assert len(b.log) == 1
    p2, _ = launch.split_scratch(b, 0, 7, (1 << 18) + 4)
    assert p2 != p1 and b.log[1:] == [("alloc", 0, (1 << 18) + 4, 7, p2), ("free", p1, 7)]
    p3, _ = launch.split_scratch(b, 0, 8, 16)  # another stream: its own buffer
    assert p3 not in (p1, p2) and b.log[-1] == ("alloc", 0, 1 << 18, 8, p3)
    p4, _ = launch.split_scratch(b, 1, 7, 16)  # another device too
    assert p4 not in (p1, p2, p3)
