"""What an evaluation runs and how: :class:`EvalConfig` and the task names (:data:`TASKS`).

Below the tasks (:mod:`~captum_iclip.evaluation.tasks`) and the run
(:mod:`~captum_iclip.evaluation.run`), so that both read the configuration by its type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from captum_iclip._io import check_output_folder
from captum_iclip.datasets import DATASETS
from captum_iclip.evaluation.benchmarks import BENCHMARKS, PROTOCOLS
from captum_iclip.evaluation.faithfulness import FILLS
from captum_iclip.evaluation.methods import method_names

TASKS = ("localization", "segmentation", "faithfulness")
"""The task names, in the order they run (each one a class of :data:`~captum_iclip.evaluation.tasks.TASK_TYPES`)."""

FAITHFULNESS_METRICS = ("infidelity", "sensitivity", "deletion", "insertion", "confidence", "road")
"""The metrics of the faithfulness task (docs/methods.md §5 and §5.1)."""

FAITHFULNESS_SCORES = ("probability", "cosine")
"""What the removal metrics read: the prompts' softmax probability (sigmoid for SigLIP) or the cosine."""


@dataclass
class EvalConfig:
    """What to evaluate and how (the model is passed to :func:`evaluate` separately).

    Args:
        dataset: A name of :data:`captum_iclip.datasets.DATASETS` (``"voc"``, ...).
        root: The dataset folder.
        split: Split name; ``None`` is the reader's default.
        methods: Method names of the registry (:mod:`captum_iclip.evaluation.methods`).
        tasks: Names of :data:`TASKS`.
        resolution: Model input side; ``None`` is the model's own input size.
        limit: Evaluate only the first ``limit`` images.
        batch_size: Images per batch.
        theta: Binarisation threshold of the explanation IoU.
        pointing_tolerance: Pointing-game tolerance, label pixels.
        background_threshold: Segmentation score under which a pixel is background
            (needs a dataset with a background class); ``None``: background prompt.
        slide: Segment with sliding windows on aspect-preserving resizes.
        window: Sliding-window side; ``None`` is the model's own input size.
        stride: Sliding-window step; ``None`` is ``window // 2``.
        faithfulness_samples: Images in the faithfulness sample.
        faithfulness_perturbations: Perturbations per image for infidelity and sensitivity.
        faithfulness_metrics: Names of :data:`FAITHFULNESS_METRICS` the faithfulness task computes.
        faithfulness_fill: What deletion removes to and insertion starts from, one of
            :data:`~captum_iclip.evaluation.faithfulness.FILLS` (``"protocol"``: Grad-ECLIP's random
            colours for deletion, black for insertion).
        faithfulness_score: The score the removal metrics (deletion, insertion, confidence, ROAD) read,
            one of :data:`FAITHFULNESS_SCORES`; ``"cosine"`` needs a ``CLIPSimilarity`` with cosine output.
        ig_steps: Integration steps of ``ig``.
        seed: Seed of every random draw (faithfulness perturbations, fills and imputation noise).
        examples: Example overlays of the localization maps to draw (rank 0's
            first images with a scored class; needs the localization task).
        workers: DataLoader worker processes.
        bootstrap: Resamples of the 95 % percentile bootstrap intervals of the
            localization figures over images (``0``: none; one process only) and of the
            faithfulness figures over the sample.
        out: Output folder; ``None`` writes nothing.
        progress: Show progress bars (rank 0).
        benchmark: A name of :data:`~captum_iclip.evaluation.benchmarks.BENCHMARKS`: run the
            training-free segmentation protocol on it (docs/benchmarks.md) instead of the tasks;
            ``dataset`` must be its reader and ``tasks`` ``("segmentation",)``.
        protocol: Whose settings of the benchmark (:data:`~captum_iclip.evaluation.benchmarks.PROTOCOLS`).
        pamr: PAMR iterations on the benchmark's logits (0: none).

    Raises:
        ValueError: On an unknown dataset, method or task, or a value out of range.
    """

    dataset: str
    root: str
    split: str | None = None
    methods: Sequence[str] = ("raw",)
    tasks: Sequence[str] = ("localization",)
    resolution: int | None = None
    limit: int | None = None
    batch_size: int = 8
    theta: float = 0.5
    pointing_tolerance: int = 15
    background_threshold: float | None = None
    slide: bool = False
    window: int | None = None
    stride: int | None = None
    faithfulness_samples: int = 8
    faithfulness_perturbations: int = 8
    faithfulness_metrics: Sequence[str] = FAITHFULNESS_METRICS
    faithfulness_fill: str = "protocol"
    faithfulness_score: str = "probability"
    ig_steps: int = 16
    seed: int = 0
    examples: int = 4
    workers: int = 0
    bootstrap: int = 0
    out: str | None = "captum-iclip-eval"
    progress: bool = True
    benchmark: str | None = None
    protocol: str = "sclip"
    pamr: int = 0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.tasks = tuple(self.tasks)
        self.faithfulness_metrics = tuple(self.faithfulness_metrics)
        if self.dataset.lower() not in DATASETS:
            raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {self.dataset!r}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: expected distinct names of {method_names()}, got {list(self.methods)}")
        for name in self.methods:
            if name not in method_names():
                raise ValueError(f"methods: expected names of {method_names()}, got {name!r}")
        if not self.tasks or any(task not in TASKS for task in self.tasks):
            raise ValueError(f"tasks: expected names of {TASKS}, got {list(self.tasks)}")
        metrics = self.faithfulness_metrics
        if not metrics or len(set(metrics)) != len(metrics) or any(m not in FAITHFULNESS_METRICS for m in metrics):
            raise ValueError(
                f"faithfulness_metrics: expected distinct names of {FAITHFULNESS_METRICS}, got {list(metrics)}"
            )
        if self.faithfulness_fill not in FILLS:
            raise ValueError(f"faithfulness_fill: expected one of {FILLS}, got {self.faithfulness_fill!r}")
        if self.faithfulness_score not in FAITHFULNESS_SCORES:
            raise ValueError(
                f"faithfulness_score: expected one of {FAITHFULNESS_SCORES}, got {self.faithfulness_score!r}"
            )
        for name in ("resolution", "window", "stride", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        for name in ("batch_size", "faithfulness_perturbations", "ig_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("faithfulness_samples", "examples", "workers", "pointing_tolerance", "bootstrap"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
        if not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"theta: expected a value in [0, 1], got {self.theta!r}")
        self._check_benchmark()
        if self.out is not None:
            check_output_folder(self.out, "out")

    def _check_benchmark(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {self.protocol!r}")
        if isinstance(self.pamr, bool) or not isinstance(self.pamr, int) or self.pamr < 0:
            raise ValueError(f"pamr: expected a non-negative int of PAMR steps, got {self.pamr!r}")
        if self.benchmark is None:
            if self.protocol != "sclip" or self.pamr:
                raise ValueError(
                    f"benchmark: expected a benchmark name with protocol={self.protocol!r} and pamr={self.pamr!r} "
                    "(they set up a benchmark's protocol), got None"
                )
            return
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark: expected one of {sorted(BENCHMARKS)}, got {self.benchmark!r}")
        reader = BENCHMARKS[self.benchmark].dataset
        if self.dataset.lower() != reader:
            raise ValueError(
                f"dataset: expected {reader!r}, the reader of benchmark {self.benchmark!r}, got {self.dataset!r}"
            )
        if self.tasks != ("segmentation",):
            raise ValueError(
                f"tasks: expected ('segmentation',) with a benchmark (it runs the segmentation protocol), "
                f"got {self.tasks}"
            )
        # What the protocol fixes (docs/benchmarks.md) must not be asked for, or it would be silently ignored.
        for name, default in (("resolution", None), ("slide", False), ("window", None), ("stride", None)):
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}: expected {default!r} with a benchmark (its protocol sets the resize and the windows; "
                    f"--protocol chooses whose), got {getattr(self, name)!r}"
                )
        if self.background_threshold is not None:
            raise ValueError(
                "background_threshold: expected None with a benchmark (its protocol sets the probability "
                f"threshold), got {self.background_threshold!r}"
            )
