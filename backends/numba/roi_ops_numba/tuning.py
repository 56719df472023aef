"""`NumbaTuning`: every constant that shapes how the numba backend splits and stages its work.

One frozen value is handed down from the backend to the planning code and the kernels; nothing
on the call path reads the environment. The defaults were chosen by measurement (the numbers are
in backends/numba/README.md); tests and developer tools pass other values to reach every path.
Importing this module does not import numba.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NumbaTuning:
    """How the numba kernels split, stage and schedule a call. Byte counts are per task.

    Attributes:
        serial_work: calls whose estimated work (elements the forward scans, or the
            backward zeroes and adds) is below this run in the calling thread, with no thread
            pool woken: a wake-up costs more than such a call, and a descheduled pool thread
            stalls the call for a scheduler time slice when the machine is busy.
        tasks_per_thread: parallel tasks wanted per thread, so that dynamic scheduling evens out
            ROI sizes.
        min_block: fewest channels per task; the inner loop is vectorised over them.
        max_block: most channels per task.
        task_output_bytes: output and argmax bytes one task writes per ROI at most (8 per
            element): the grouped task's tile of results, their positions and its transpose
            table are each about half that, and stay in the core's cache.
        stage_bytes: the largest channels-last copy of one ROI's window (or one bin row's band)
            that the per-ROI kernel makes for an input whose channels are not contiguous; larger
            ones are gathered in place.
        stage_min_coverage: float32/float64 inputs whose channels are not contiguous: an
            image's ROIs are staged together (their region once per task, re-read from cache)
            when their windows cover at least this many times the area of their bounding box;
            the ROIs of a sparser image each stage only their own window.
        stage_min_block: fewest channels per grouped task (long scan loops vectorise well).
        stage_task_bytes: the most input one grouped task stages (region x channel block).
        stage_max_bytes: the most a thread's staging buffer holds; a region whose one channel is
            larger goes to the per-ROI kernel.
        backward_block_bytes: the planes one backward task accumulates together, at most.
        backward_prefetch_bytes: a backward task whose share of one ROI's argmax (its channel
            block's bins) is at most this long prefetches the argmax and gradient of the ROIs
            ahead: such short runs, a whole ROI's row apart, defeat the hardware prefetchers.
        huge_page_min_bytes: buffers at least this large are advised into transparent huge pages
            (Linux): first-touch page faults of fresh outputs otherwise cost as much as a kernel.
        stream_min_bytes: float32/float64 forwards whose output and argmax together are at
            least this large write them with non-temporal stores (no read of each output line
            before it is written); smaller outputs stay in cache for whatever reads them next.
    """

    serial_work: int = 1 << 21
    tasks_per_thread: int = 8
    min_block: int = 16
    max_block: int = 256
    task_output_bytes: int = 128 * 1024
    stage_bytes: int = 512 * 1024
    stage_min_coverage: float = 0.5
    stage_min_block: int = 64
    stage_task_bytes: int = 16 * 2**20
    stage_max_bytes: int = 32 * 2**20
    backward_block_bytes: int = 512 * 1024
    backward_prefetch_bytes: int = 2048
    huge_page_min_bytes: int = 4 * 2**20
    stream_min_bytes: int = 32 * 2**20


DEFAULT_TUNING = NumbaTuning()
