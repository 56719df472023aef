"""`CupyTuning`: every constant the launch planning of the CuPy backend chooses by, in one value.

The backend plans with `DEFAULT_TUNING`. Probes and tests that compare variants build another
value with `dataclasses.replace` and hand it to `roi_ops_cupy.launch.Launcher` (or to the
planning functions); nothing reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CupyTuning:
    """Launch-planning constants of the CuPy backend, and optional forced choices.

    Attributes:
        block_elements: outputs per block of the plane kernel and of the atomic backward while
            grad_input fits in L2.
        unit_block_elements_cached: outputs per block of the unit kernel when the input fits
            in L2: large blocks amortise each thread's bin geometry over many channels.
        unit_block_elements_streamed: the same when it does not: small channel blocks keep the
            planes that the resident blocks read together (all ROIs of one channel block run
            first) small enough to stay in L2. Counted for 4-byte elements: 16-bit inputs take
            twice as many outputs a block (the same bytes of planes), float64 half as many.
        unit_block_elements_levels: the same for the fused multi-level launch when its levels
            together do not fit in L2 (counted the same way): its blocks pool every level, most
            of them from levels far smaller than the finest, and larger channel blocks were
            faster there (docs/dev-log.md, fpn-multi).
        backward_block_elements_streamed: outputs per block of the atomic backward when
            grad_input does not fit in L2 (the planes being added into stay in L2).
        min_blocks_per_sm: channel blocks are halved until the grid has this many blocks per
            SM.
        chan_min_channels: channels_last inputs with fewer channels take the plane kernel
            (idle lanes make the channel-lane kernels the worse choice).
        max_cached_edges: the chan kernel caches its bin edges in shared memory up to this
            PH + PW.
        planes_channels: channels per block of the planes backward.
        planes_min_blocks_per_sm: the planes backward runs only with N * C at least this many
            blocks per SM, or with a gradient of at most `planes_small_gradient_bytes`.
        planes_small_gradient_bytes: gradients this small (counted in the atomic kernel's
            accumulation dtype, float32 for 16-bit inputs) take the planes backward whatever
            their block count: both kernels then take less device time than the host spends
            on a launch, and the planes kernel needs no zero fill (one launch instead of two).
        planes_group_min_checks: the single-level planes backward reads each image's ROIs
            from a list made before it (`planning.groups_rois_first`) when its blocks would
            otherwise check at least this many batch indices in all (blocks x K); chosen from
            the measurements in docs/dev-log.md.
        small_roi_outputs: inputs with a unit W stride whose ROIs have at most this many
            outputs (C * PH * PW) take the small kernel (many ROIs per block) instead of the
            unit kernel (one ROI per block); 0 never.
        small_block_elements: outputs per block of the small kernel (whole ROIs).
        stage_channels_last: None, or whether a forward of an NCHW-like input (unit W
            stride, 16-byte channel vectors when copied) pools a channels_last copy of it with
            the channel-vector kernels (of a pyramid: every level); None:
            `planning.stages_channels_last` (`planning.stages_pyramid`) decides.
        stage_min_reads: outside the small kernels' regime, a forward is staged only when its
            outputs are at least this many times its input's elements.
        stage_min_reads_16bit_beyond_l2: `stage_min_reads` for 16-bit inputs that do not fit
            in L2, whose copy reads two positions a load and whose NCHW windows are re-read from
            memory (the break-even, measured on fpn-p2, is in tools/NOTES.md).
        max_tables: None, or whether single-map inference on the cvec kernels queues the
            tables of maxima (True: wherever they can be read, always built; False: never);
            None: `planning.uses_max_tables` decides, and the device from the ROIs
            (tools/NOTES.md, "Tables of maxima").
        table_min_saved_reads: the tables are built and read when the element reads they save
            (one channel, every bin of every ROI) are at least this many per map position: a
            build costs about a pass over the map (the break-even in tools/NOTES.md).
        table_min_outputs: calls with fewer outputs never queue the tables.
        table_max_bytes: nor calls whose tables (twice the map) would take more memory.
        cvec_wide: None, or whether a single-map forward for which the cvec kernel is chosen
            runs its wide twin (four vectors a thread in float32) instead; None:
            `planning.cvec_wide` decides.
        cvec_wide_tile_bytes: the wide kernel's tile in float32 with the argmax (dynamic shared
            memory) on maps in L2, where four blocks of it fit an SM (else the static tile's
            size, `planning.cvec_tile_bytes`): room for the outputs of eight 16-channel lanes on
            7x7 bins.
        forward_kernel: None, or a forward kernel name (`kernels.FORWARD_KERNELS`) to run
            wherever it can run (plane and chan run on every layout).
        backward_kernel: None, or `kernels.BACKWARD_ATOMIC`, `kernels.BACKWARD_PLANES` or
            `kernels.BACKWARD_PLANES_GROUPED` (planes only where its planes fit in shared
            memory).
        planes_threads: None, or the planes backward's block size (`kernels.PLANES_THREADS`).
        channels_last_gradient: None, or whether the backward writes a channels_last input's
            gradient channels_last (else contiguous, which roi_ops copies).
    """

    block_elements: int = 2048
    unit_block_elements_cached: int = 8192
    unit_block_elements_streamed: int = 1024
    unit_block_elements_levels: int = 4096
    backward_block_elements_streamed: int = 512
    min_blocks_per_sm: int = 8
    chan_min_channels: int = 16
    max_cached_edges: int = 2048
    planes_channels: int = 1
    planes_min_blocks_per_sm: int = 4
    planes_small_gradient_bytes: int = 8 << 20
    planes_group_min_checks: int = 1 << 24
    small_roi_outputs: int = 1024
    small_block_elements: int = 4096
    stage_channels_last: bool | None = None
    stage_min_reads: float = 2.0
    stage_min_reads_16bit_beyond_l2: float = 0.4
    max_tables: bool | None = None
    table_min_saved_reads: float = 20.0
    table_min_outputs: int = 1 << 22
    table_max_bytes: int = 2 << 30
    cvec_wide: bool | None = None
    cvec_wide_tile_bytes: int = 51200
    forward_kernel: str | None = None
    backward_kernel: str | None = None
    planes_threads: int | None = None
    channels_last_gradient: bool | None = None


DEFAULT_TUNING = CupyTuning()
