"""The event-loop plumbing of the server: the doorbell and the reply slot."""
from __future__ import annotations

import asyncio
import threading

import pytest
from trtserve_client.frames import FrameDecoder, pack
from trtserve_client.wire import decode_tensors

from trtserve.server.doorbell import Doorbell
from trtserve.server.handlers import Deferred
from trtserve.server.reply import Reply


def test_doorbell_runs_every_post_once_on_the_loop_thread():
    posters, per_poster = 8, 2000

    async def scenario():
        loop = asyncio.get_running_loop()
        bell = Doorbell(loop)
        seen: list[tuple[int, int]] = []
        threads_seen: set[int] = set()
        all_done = asyncio.Event()

        def record(poster: int, n: int) -> None:
            threads_seen.add(threading.get_ident())
            seen.append((poster, n))
            if len(seen) == posters * per_poster:
                all_done.set()

        def post_many(poster: int) -> None:
            for n in range(per_poster):
                bell.post(record, poster, n)

        threads = [threading.Thread(target=post_many, args=(p,)) for p in range(posters)]
        for t in threads:
            t.start()
        await asyncio.wait_for(all_done.wait(), 30)
        for t in threads:
            t.join()
        await asyncio.sleep(0.01)  # a late duplicate run would show up here
        return seen, threads_seen, threading.get_ident()

    seen, threads_seen, loop_thread = asyncio.run(scenario())
    assert len(seen) == posters * per_poster and len(set(seen)) == len(seen)
    for poster in range(posters):  # each poster's calls run in the order it posted them
        assert [n for p, n in seen if p == poster] == list(range(per_poster))
    assert threads_seen == {loop_thread}


def test_doorbell_keeps_draining_after_a_failing_call(caplog):
    async def scenario():
        bell = Doorbell(asyncio.get_running_loop())
        ran = []
        bell.post(lambda: 1 / 0)
        bell.post(ran.append, "after")
        await asyncio.sleep(0.05)
        return ran

    assert asyncio.run(scenario()) == ["after"]
    assert "a completion handed to the event loop failed" in caplog.text


def test_doorbell_on_a_closed_loop_drops_the_call():
    loop = asyncio.new_event_loop()
    bell = Doorbell(loop)
    loop.close()
    bell.post(print, "never")  # no exception: nobody waits for this answer any more


def _record(calls):
    return lambda arg, reply: calls.append((arg, reply))


def test_reply_calls_back_at_once_with_its_argument_and_the_result():
    reply, calls = Reply(), []
    reply.add_done_callback(_record(calls), 7)
    assert not reply.done and calls == []
    reply.set_result({"x": 1})
    assert calls == [(7, reply)] and reply.done and not reply.cancelled
    assert reply.value == {"x": 1} and reply.error is None


def test_reply_set_before_the_callback_calls_it_on_registration():
    reply, calls = Reply(), []
    error = ValueError("bad")
    reply.set_exception(error)
    reply.add_done_callback(_record(calls), "id")
    assert calls == [("id", reply)] and reply.error is error and reply.value is None


def test_reply_cancel_and_double_set():
    reply, calls = Reply(), []
    reply.add_done_callback(_record(calls), 1)
    assert reply.cancel() is True and reply.cancelled and calls == [(1, reply)]
    assert reply.cancel() is False
    with pytest.raises(RuntimeError, match="already done"):
        reply.set_result(1)
    with pytest.raises(RuntimeError, match="one callback"):
        reply.add_done_callback(_record(calls), 2)


@pytest.mark.parametrize("outcome", ["result", "error", "cancel"])
def test_a_deferred_operation_settles_with_its_job(outcome):
    async def scenario():
        future = asyncio.get_running_loop().create_future()
        reply, calls = Deferred(future), []
        reply.add_done_callback(_record(calls), 3)
        if outcome == "result":
            future.set_result("loaded")
        elif outcome == "error":
            future.set_exception(KeyError("nope"))
        else:
            future.cancel()
        await asyncio.sleep(0)  # asyncio runs a future's callbacks one loop turn later
        assert calls == [(3, reply)]
        return reply

    reply = asyncio.run(scenario())
    assert reply.cancelled is (outcome == "cancel")
    assert (reply.value == "loaded") is (outcome == "result")
    assert isinstance(reply.error, KeyError) is (outcome == "error")


def test_cancelling_a_deferred_operation_ignores_the_end_of_its_job():
    async def scenario():
        future = asyncio.get_running_loop().create_future()
        reply, calls = Deferred(future), []
        reply.add_done_callback(_record(calls), 4)
        assert reply.cancel() is True
        future.set_result("late")  # the job finished after its caller went away
        await asyncio.sleep(0)
        return reply, calls

    reply, calls = asyncio.run(scenario())
    assert reply.cancelled and reply.value is None and len(calls) == 1


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.pieces: list[list] = []  # what each writelines was given
        self.closing = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def writelines(self, pieces) -> None:
        self.pieces.append(list(pieces))
        self.writes.append(b"".join(pieces))

    def is_closing(self) -> bool:
        return self.closing


def test_writer_sends_a_lone_frame_at_once_and_coalesces_the_rest():
    from trtserve_client.writer import CoalescingWriter

    async def scenario():
        transport = RecordingTransport()
        writer = CoalescingWriter(transport, asyncio.get_running_loop())
        writer.write([b"lone"], alone=True)
        assert transport.writes == [b"lone"]  # no loop turn needed
        writer.write([b"a"], alone=False)
        writer.write([b"b"], alone=True)  # alone, but frames are queued: keeps the order
        writer.write([b"c", b"C"], alone=False)
        assert transport.writes == [b"lone"]
        await asyncio.sleep(0)
        assert transport.writes == [b"lone", b"abcC"]  # one write for the turn
        writer.write([b"d"], alone=False)
        writer.flush()  # what a close does first
        assert transport.writes[-1] == b"d"
        transport.closing = True
        writer.write([b"late"], alone=False)
        await asyncio.sleep(0)
        return transport.writes

    assert asyncio.run(scenario()) == [b"lone", b"abcC", b"d"]  # nothing written once closing


def test_writer_joins_small_pieces_and_passes_large_ones_by_reference():
    from trtserve_client.writer import JOIN_BELOW, CoalescingWriter

    big = memoryview(bytearray(b"x" * JOIN_BELOW))

    async def scenario():
        transport = RecordingTransport()
        writer = CoalescingWriter(transport, asyncio.get_running_loop())
        writer.write([b"head1", b"pad", big, b"tail"], alone=False)
        writer.write([b"head2"], alone=False)
        await asyncio.sleep(0)
        return transport.pieces

    [pieces] = asyncio.run(scenario())
    assert pieces[0] == b"head1pad" and pieces[2] == b"tailhead2"
    assert pieces[1] is big  # the tensor's own memory, not a copy


def test_the_server_deadline_timer_drops_a_queued_request_and_counts_it(tmp_path, probe):
    """InferCall.expire (the loop timer) on a request still queued, with no scheduler
    deadline to race it: answered DEADLINE_EXCEEDED, never run, counted once."""
    from trtserve.errors import DeadlineExceededError
    from trtserve.repository import ModelRepository
    from trtserve.server.infer import InferHandler

    folder = tmp_path / "gated" / "1"
    folder.mkdir(parents=True)
    (tmp_path / "gated" / "config.toml").write_text(f'backend = "Probe"\nprobe = "{probe.key}"\nmax = 1\n')
    repository = ModelRepository(tmp_path)
    repository.load_all()

    async def scenario():
        handler = InferHandler(repository, asyncio.get_running_loop())
        message = {"model": "gated", "inputs": {"x": b"first"}}
        probe.gate.clear()
        running = handler(message)
        probe.wait_entered()
        queued = handler({"model": "gated", "inputs": {"x": b"second"}})  # no timeout_ms
        queued.expire(0.05)  # what the loop timer does when timeout_ms passes
        assert isinstance(queued.error, DeadlineExceededError)
        probe.gate.set()
        while not running.done:
            await asyncio.sleep(0.005)
        return running.value

    try:
        outputs = asyncio.run(scenario())["outputs"]
        [received] = FrameDecoder(1 << 20).feed(pack({"outputs": outputs}))
        assert decode_tensors(received["outputs"], "outputs") == {"output": b"first"}
        stats = repository.get("gated").statistics()
        assert stats["success_count"] == 1 and stats["failure_by_reason"] == {"DEADLINE_EXCEEDED": 1}
        assert [data for _, data in probe.batches] == [[b"first"]]
    finally:
        probe.gate.set()
        repository.close()
