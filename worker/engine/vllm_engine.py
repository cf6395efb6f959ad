"""vLLM behind docbatch's engine seam: the engine on a GPU (continuous batching, paged KV cache with prefix
caching, chunked prefill, FlashAttention 3, CUDA graphs, tensor parallelism, image inputs, quantised checkpoints).

docbatch keeps what only a batch system knows (its prompts and tokenization, which jobs go in together, validation
and repair) and hands vLLM token ids. One thread drives vLLM's `LLMEngine` (`add_request` / `step` /
`abort_request`: the calls `LLM.generate` makes), so its engine core, a process of its own, never waits on
docbatch's task threads; they call `submit` and wait on a future.

Requests start when this adapter hands them to vLLM, which it does while fewer than `max_in_engine` are there
(vLLM's `max_num_seqs` rows plus a few, so a finished row's place is taken at once). Until then a request waits here
and `future.cancel()` drops it without any compute; `abort` also takes back one vLLM already holds. vLLM answers an
aborted request with no output, so the adapter settles its future itself.

Order: first come, first served, except that the prompts of one prefix group (`ModelInput.prefix_group`: one
document's tasks) keep their group's place in line, here and in vLLM's scheduler (its priority policy, the place as
the priority). A document's second task thus runs right behind its first, while vLLM's prefix cache still holds the
document: its prompt is computed once. Served in arrival order, a batch of two tasks over many documents would meet
each document again only after every other document's first task had gone through the cache.

When vLLM's engine core dies, vLLM's synchronous client may wait for its output forever (0.32 does), so a watchdog
thread watches the processes vLLM started and calls `on_fatal` when one of them is gone.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from worker.engine.request import (
    Completion,
    EngineStats,
    GenerationOptions,
    ModelInput,
    RequestAborted,
    RequestTooLarge,
)

log = logging.getLogger(__name__)
STATS_LOG_INTERVAL_S = 10  # also logged whenever the engine runs out of work
WATCH_INTERVAL_S = 1.0  # how often the watchdog looks at vLLM's processes


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: dict[str, Any]  # vLLM's TokensPrompt: prompt_token_ids (+ multi_modal_data)
    params: Any  # vLLM's SamplingParams
    future: Future
    num_prompt_tokens: int
    group: str | None  # its ModelInput's prefix_group
    place: int = 0  # its place in line: its group's (vLLM's priority; lower goes first)
    in_engine: bool = False
    most_beside: int = field(default=0)  # the most requests vLLM held at once while it held this one


def one_placeholder_per_image(token_ids: list[int], image_token_id: int | None) -> list[int]:
    """`token_ids` with each run of the image placeholder (one per image patch) cut to one placeholder."""
    if image_token_id is None:
        raise ValueError("a prompt with images needs a vision model (its config's image_token_id)")
    return [t for i, t in enumerate(token_ids) if t != image_token_id or i == 0 or token_ids[i - 1] != image_token_id]


class VllmEngine:
    """Build with `VllmEngine(make_llm, ...)`, then `start()`: `make_llm(stat_loggers)` returns the `vllm.LLMEngine`
    made with those stat loggers (its engine core starts then: minutes for a 7B on a GPU). `eos_token_ids` are
    stripped from answers, as the other engines do; `max_in_engine` bounds what vLLM holds at once (see the module
    docstring)."""

    processes_images = True  # vLLM's processor turns page images into tensors: prompts need only their placeholders

    def __init__(self, make_llm: Callable[[list[Any]], Any], *, max_num_seqs: int, eos_token_ids: frozenset[int],
                 image_token_id: int | None = None, max_in_engine: int | None = None) -> None:
        self._make_llm = make_llm
        self.max_num_seqs = max_num_seqs
        self.max_in_engine = max_in_engine or max_num_seqs + max(8, max_num_seqs // 8)
        self.eos_token_ids = eos_token_ids
        self.image_token_id = image_token_id  # a vision model's image placeholder (its processor repeats it)
        self.llm: Any = None
        self.max_model_len = 0
        self.kv_capacity_tokens = 0
        self._inbox: queue.SimpleQueue[tuple[str, _Request]] = queue.SimpleQueue()
        self._waiting: list[tuple[int, int, _Request]] = []  # a heap by (place, arrival)
        self._held: dict[str, _Request] = {}  # what vLLM holds now, by request id
        self._groups: dict[str, list[int]] = {}  # prefix group -> [its place, its requests here or in vLLM]
        self._places = itertools.count()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="docbatch-vllm", daemon=True)
        self._processes: list[Any] = []  # psutil.Process of each process vLLM started (engine core, GPU workers)
        # When vLLM's engine core dies nothing will answer the waiting requests: by default fail them all; a worker
        # process exits instead (`worker.service.process`), so that its supervisor starts a fresh one.
        self.on_fatal: Callable[[BaseException], None] = self._fail_all
        self.stats = EngineStats()
        self._running_in_vllm = 0  # vLLM's own scheduler figures, from its stat logger (`_stat_logger`)
        self._waiting_in_vllm = 0
        self._logged_at = time.monotonic()

    # -- life -------------------------------------------------------------------------------------------------
    def start(self) -> "VllmEngine":
        import psutil

        started = time.perf_counter()
        me = psutil.Process()
        before = {child.pid for child in me.children(recursive=True)}
        self.llm = self._make_llm([self._stat_logger()])
        self._processes = [child for child in me.children(recursive=True) if child.pid not in before]
        config = self.llm.vllm_config
        self.max_model_len = config.model_config.max_model_len
        cache = config.cache_config
        self.kv_capacity_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        stats = self.stats
        stats.kv_block_tokens, stats.kv_blocks_total = cache.block_size, cache.num_gpu_blocks or 0
        stats.kv_capacity_tokens = self.kv_capacity_tokens
        stats.kv_capacity_sequences = self.kv_capacity_tokens // 4096
        log.info("vLLM engine: KV cache %d tokens (%d blocks of %d), context %d tokens, up to %d rows a step; "
                 "started in %.1f s", self.kv_capacity_tokens, stats.kv_blocks_total, cache.block_size,
                 self.max_model_len, self.max_num_seqs, time.perf_counter() - started)
        self._thread.start()
        threading.Thread(target=self._watch, name="docbatch-vllm-watchdog", daemon=True).start()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        """Stop the loop (waiting out the step in flight, unless vLLM is gone) and vLLM's processes."""
        gone = self._stop.is_set()  # the watchdog saw vLLM's processes end: the loop may never come back
        self._stop.set()
        self._thread.join(0 if gone else timeout_s)
        self._fail_all(RuntimeError("the engine stopped"))
        if self.llm is not None and not self._thread.is_alive():
            shutdown = getattr(self.llm.engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()

    # -- the seam ---------------------------------------------------------------------------------------------
    def submit(self, model_input: ModelInput, max_new_tokens: int,
               options: GenerationOptions = GenerationOptions()) -> Future:
        """Queue one prompt; the future resolves to a `Completion`, or raises `RequestTooLarge` (it can never
        fit), `ValueError` (a bad request), `RequestAborted` (`abort`), or what vLLM refused it with."""
        future: Future = Future()
        try:
            request = self._request(model_input, max_new_tokens, options, future)
        except (ValueError, RequestTooLarge) as error:
            future.set_exception(error)
            return future
        if self._stop.is_set():
            future.set_exception(RuntimeError("the engine is stopped"))
            return future
        future.add_done_callback(lambda done: done.cancelled() and self._inbox.put(("abort", request)))
        self._inbox.put(("add", request))
        return future

    def abort(self, future: Future) -> None:
        """Take the request of `future` back wherever it is (waiting here, or in vLLM); its future raises
        `RequestAborted`. Nothing happens to a future that is done."""
        request = getattr(future, "_docbatch_request", None)
        if request is not None and not future.done():
            self._inbox.put(("abort", request))

    def _request(self, model_input: ModelInput, max_new_tokens: int, options: GenerationOptions,
                 future: Future) -> _Request:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        tokens = model_input.token_ids
        if not tokens or max_new_tokens < 1:
            raise ValueError("a request needs at least one prompt token and one new token")
        if len(tokens) + max_new_tokens > self.max_model_len:
            raise RequestTooLarge(f"the prompt's {len(tokens)} tokens and {max_new_tokens} new ones exceed the "
                                  f"model's context of {self.max_model_len}")
        if self.kv_capacity_tokens and len(tokens) + max_new_tokens > self.kv_capacity_tokens:
            raise RequestTooLarge(f"{len(tokens)} + {max_new_tokens} tokens exceed the KV cache "
                                  f"({self.kv_capacity_tokens} tokens)")
        structured = StructuredOutputsParams(json=model_input.json_schema) if model_input.json_schema else None
        params = SamplingParams(max_tokens=max_new_tokens, temperature=options.temperature,
                                top_p=options.top_p if not options.is_greedy else 1.0,
                                repetition_penalty=options.repetition_penalty, ignore_eos=options.ignore_eos,
                                structured_outputs=structured, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        prompt: dict[str, Any] = {"prompt_token_ids": list(tokens)}
        if model_input.images:  # vLLM's processor repeats each image's placeholder itself: one each is handed over
            prompt = {"prompt_token_ids": one_placeholder_per_image(tokens, self.image_token_id),
                      "multi_modal_data": {"image": list(model_input.images)}}
        request = _Request(str(next(self._ids)), prompt, params, future, len(tokens), model_input.prefix_group)
        future._docbatch_request = request  # type: ignore[attr-defined] - what `abort` finds it by
        return request

    # -- the loop ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_commands(wait=not self._held and not self._waiting)
                self._hand_over()
                if self._held:
                    self._finish(self.llm.step())
        except BaseException as error:  # noqa: BLE001 - vLLM's engine core died, or this loop broke
            log.critical("the vLLM engine loop broke: %r", error, exc_info=error)
            self.on_fatal(error)

    def _watch(self) -> None:
        import psutil

        while not self._stop.wait(WATCH_INTERVAL_S):
            for process in self._processes:
                try:
                    alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive and not self._stop.is_set():
                    error = RuntimeError(f"vLLM's process {process.pid} ended")
                    log.critical("the vLLM engine cannot go on: %s", error)
                    self.on_fatal(error)
                    return

    def _take_commands(self, wait: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.2) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, request = command
            if kind == "add":
                self._queue(request)
            else:
                self._take_back(request)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _queue(self, request: _Request) -> None:
        """Give the request its place in line (its prefix group's, if the group is here or in vLLM) and queue it."""
        if request.group is None:
            request.place = next(self._places)
        else:
            group = self._groups.setdefault(request.group, [next(self._places), 0])
            group[1] += 1
            request.place = group[0]
        heapq.heappush(self._waiting, (request.place, int(request.request_id), request))

    def _leave(self, request: _Request) -> None:
        """The request is done here (answered, refused or taken back): its group keeps its place while it has others."""
        group = self._groups.get(request.group) if request.group is not None else None
        if group is not None:
            group[1] -= 1
            if not group[1]:
                del self._groups[request.group]

    def _hand_over(self) -> None:
        """Hand waiting requests to vLLM, first place first, while it holds fewer than `max_in_engine`."""
        while self._waiting and len(self._held) < self.max_in_engine:
            request = heapq.heappop(self._waiting)[2]
            if not request.future.set_running_or_notify_cancel():
                self._leave(request)
                continue  # cancelled while it waited here: never computed
            try:
                self.llm.add_request(request.request_id, request.prompt, request.params, priority=request.place)
            except ValueError as error:  # vLLM refused it (too long for its limits, a schema it cannot compile)
                self._leave(request)
                request.future.set_exception(error)
                continue
            request.in_engine = True
            self._held[request.request_id] = request
        beside = len(self._held)
        for request in self._held.values():
            request.most_beside = max(request.most_beside, beside)

    def _take_back(self, request: _Request) -> None:
        if request.in_engine:
            if self._held.pop(request.request_id, None) is None:
                return  # finished meanwhile
            self.llm.abort_request([request.request_id])
            request.in_engine = False
            self._leave(request)
        else:
            queued = [entry for entry in self._waiting if entry[2] is not request]
            if len(queued) < len(self._waiting):
                self._waiting = queued
                heapq.heapify(self._waiting)
                self._leave(request)
        if not request.future.done():
            request.future.set_exception(RequestAborted("the request was aborted"))

    def _finish(self, outputs: list[Any]) -> None:
        finished = 0
        for output in outputs:
            if not output.finished:
                continue
            request = self._held.pop(output.request_id, None)
            if request is None:
                continue  # aborted meanwhile
            self._leave(request)
            finished += 1
            completion = output.outputs[0]
            token_ids = list(completion.token_ids)
            if token_ids and completion.finish_reason == "stop" and token_ids[-1] in self.eos_token_ids:
                token_ids.pop()
            stats = self.stats
            stats.tokens_out += len(token_ids)
            cached = output.num_cached_tokens or 0
            stats.tokens_in += request.num_prompt_tokens - cached
            stats.prefix_cache_hit_tokens += cached
            request.future.set_result(Completion(token_ids, min(request.most_beside, self.max_num_seqs)))
        self._record(finished)

    def _record(self, finished: int) -> None:
        stats = self.stats
        stats.num_steps += 1
        stats.num_requests_finished += finished
        stats.num_running = self._running_in_vllm
        stats.num_waiting = len(self._waiting) + self._waiting_in_vllm
        now = time.monotonic()
        if now - self._logged_at >= STATS_LOG_INTERVAL_S or not (self._held or self._waiting):
            self._logged_at = now
            log.info("engine stats: %s", stats.summary())

    def _stat_logger(self) -> Callable[..., Any]:
        """A factory of vLLM stat loggers that write what vLLM's scheduler reports (rows running and waiting in
        it, KV cache use, preemptions) into this engine's figures; vLLM calls `record` in `step`, on the loop's
        thread."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class EngineStatsLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                stats = engine.stats
                if scheduler_stats is not None:
                    engine._running_in_vllm = scheduler_stats.num_running_reqs
                    engine._waiting_in_vllm = scheduler_stats.num_waiting_reqs
                    stats.kv_blocks_used = round(scheduler_stats.kv_cache_usage * stats.kv_blocks_total)
                if iteration_stats is not None:
                    stats.num_preemptions += iteration_stats.num_preempted_reqs

            def log_engine_initialized(self) -> None:
                pass

        return EngineStatsLogger

    def _fail_all(self, error: BaseException) -> None:
        self._stop.set()
        # copies: the watchdog may call this
        for request in list(self._held.values()) + [entry[2] for entry in list(self._waiting)]:
            if not request.future.done():
                request.future.set_exception(RuntimeError(f"the engine stopped: {error!r}"))
        self._held.clear()
        self._waiting.clear()
        self._groups.clear()
