"""The ``wsi-espnet`` command line.

Exit codes: 0 success (also when the outputs were already complete); 2 bad input or usage (a
message says what to fix: missing or unreadable slide, missing MPP, unwritable or full output
folder, outputs of another run in the way); 3 a checkpoint that is missing, corrupted or does not
fit; 130 interrupted (rerun the same command to resume); 1 an unexpected internal error (a bug).

``batch`` (a cohort on one Dask cluster) exits 0 when every slide was segmented or already complete;
4 when one or more slides failed (the others are done; the report next to the outputs gives each
slide's reason); 2 for a bad pipeline or cohort manifest (nothing is run); 3 for a bad checkpoint;
130 when interrupted (finished tiles are kept; rerun to resume). ``batch --print-cluster-spec`` prints a
Kubernetes pipeline's DaskCluster as YAML, or a SLURM/PBS pipeline's worker job script, and exits 0,
running nothing (2 for a local or scheduler pipeline).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_espnet import __version__
from wsi_espnet.errors import InputError, WsiEspnetError, render_options

if TYPE_CHECKING:
    from tqdm import tqdm

    from wsi_espnet.batch import ClusterSpec, Pipeline
    from wsi_espnet.segment_slide import SegmentationResult, SegmentOptions
    from wsi_espnet.segmentation import ProgressEvent

__all__ = ["PARTIAL_FAILURE", "main"]

#: Exit code of ``batch`` when some slides failed and the others were done.
PARTIAL_FAILURE = 4
#: wsi_espnet.inference.runtimes.RUNTIMES, spelt out so that parsing arguments does not import torch.
RUNTIMES = ("auto", "torch", "openvino", "openvino-bf16", "onnx")
RUNTIME_HELP = (
    "where the model runs: auto (on a CPU, the fastest of torch, openvino and onnx whose labels agree with PyTorch "
    "fp32 on 99.9%% of a check of the first window; torch on a GPU), torch, openvino, onnx, or openvino-bf16 "
    "(faster on CPUs with native bf16; labels differ from fp32 on ~0.3%% of pixels; never chosen by auto) "
    "(default auto)"
)


def _cmd_models(args: argparse.Namespace) -> int:
    from wsi_espnet.models import build_espnet, count_multiply_adds, count_parameters, get_model_config, list_models
    from wsi_espnet.models.registry import DEFAULT_MODEL, list_packaged_models

    print("Trained models in the package (use the name as --model; model cards beside the files):")
    trained_header = f"{'name':<22} {'classes':>7} {'um/px':>6}  class names"
    print(trained_header)
    print("-" * len(trained_header))
    for packaged in list_packaged_models():
        mpp = "-" if packaged.config.target_mpp is None else f"{packaged.config.target_mpp:g}"
        default = "  [default]" if packaged.name == DEFAULT_MODEL else ""
        names = ", ".join(packaged.config.class_names)
        print(f"{packaged.name:<22} {packaged.config.num_classes:>7} {mpp:>6}  {names}{default}")
        print(f"{'':<22} {'':>7} {'':>6}  card: {packaged.card}")
    print()
    print("Architectures (untrained; build with create_model or train with 'wsi-espnet train'):")
    rows = []
    for entry in list_models():  # everything is validated before anything is printed
        config = (
            entry.config if args.num_classes is None else get_model_config(entry.name, num_classes=args.num_classes)
        )
        params = count_parameters(build_espnet(config))
        macs = count_multiply_adds(config, height=args.height, width=args.width)
        rows.append(f"{entry.name:<22} {config.num_classes:>7} {params:>11,} {macs / 1e9:>7.2f}  {entry.description}")
    print(f"Multiply-adds of the convolutions for one {args.width}x{args.height} (width x height) image.")
    header = f"{'name':<22} {'classes':>7} {'parameters':>11} {'GMACs':>7}  description"
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    return 0


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from wsi_espnet.models import count_parameters, load_original_checkpoint, save_model

    model, config = load_original_checkpoint(
        args.input, num_classes=args.num_classes, dataset=args.dataset, name=args.name
    )
    out = save_model(model, config, args.output)
    print(
        f"wrote {out}: {config.variant}, {config.num_classes} classes, alpha2={config.alpha2}, "
        f"alpha3={config.alpha3}, {count_parameters(model):,} parameters; input {config.preprocessing.channel_order}, "
        f"(x - mean) / std / {config.preprocessing.scale_divisor:g}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from wsi_espnet.inference.onnx_export import export_onnx
    from wsi_espnet.models import load_model

    if args.onnx is None:
        raise InputError("say which format to export: --onnx OUT.onnx")
    model, config = load_model(args.model)
    out = export_onnx(model, config, args.onnx, height=args.height, width=args.width)
    print(f"wrote {out}: input 'image' (B, {config.in_channels}, H, W) normalised float32, H and W multiples of 8")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from wsi_espnet.slides import describe_slide, open_slide

    with open_slide(args.slide, mpp=args.mpp) as reader:
        print(describe_slide(reader))
    return 0


def _segment_options(args: argparse.Namespace) -> SegmentOptions:
    from wsi_espnet.segment_slide import FORMATS, SegmentOptions
    from wsi_espnet.tissue_detection import TissueOptions

    formats = set(FORMATS) if args.format == "all" else {f.strip() for f in args.format.split(",") if f.strip()}
    return SegmentOptions(
        out_dir=args.out,
        formats=frozenset(formats),
        mpp=args.mpp,
        target_mpp=args.target_mpp,
        tile_size=args.tile_size,
        halo=args.halo,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        tissue=TissueOptions(enabled=not args.no_tissue_detection, threshold=args.tissue_threshold),
        overwrite=args.overwrite,
        scheduler=args.scheduler,
        workers=args.workers,
    )


def _print_reliability(trust: dict[str, Any] | None) -> None:
    """The confidence and stain lines of the summary (the warnings themselves were logged during the run)."""
    if not trust:
        return
    confidence, stain = trust["confidence"], trust["stain"]
    if confidence["low_confidence_fraction"] is not None:
        flag = "  (!)" if confidence["low_confidence_fraction"] > confidence["warn_above"] else ""
        print(
            f"low confidence: {confidence['low_confidence_fraction']:.1%} of tissue has top-class probability "
            f"< {confidence['low_below']:.2f} (warned above {confidence['warn_above']:.0%}){flag}"
        )
    if stain["distance"] is not None:
        flag = "  (!)" if stain["distance"] > stain["warn_above"] else ""
        normalised = "; slide normalised to it" if stain["normalised"] else ""
        print(
            f"stain distance from training data: {stain['distance']:.2f} in OD space "
            f"(warned above {stain['warn_above']:.2f}){normalised}{flag}"
        )
    elif stain["slide"] is None:
        print("stain distance: not measured (too little stained tissue for an estimate)")
    else:
        print("stain distance: not measured (the model stores no training stain)")


def _print_summary(result: SegmentationResult, *, quiet: bool) -> None:
    record = result.provenance
    if quiet:
        return
    print(f"outputs ({'already complete' if result.skipped else 'written'}):")
    for name, path in result.outputs.items():
        print(f"  {name:<12} {path}")
    if "classes" in record:
        tissue = record["tissue"]
        print(f"tissue: {tissue['segmented_area_mm2']:.3f} mm^2 ({tissue['method']} detection)")
        print(f"{'class':<24} {'area mm^2':>10} {'of tissue':>10}")
        for entry in record["classes"][1:]:
            share = entry["fraction_of_tissue"]
            print(f"{entry['name']:<24} {entry['area_mm2']:>10.4f} {'' if share is None else f'{share:.1%}':>10}")
        _print_reliability(record.get("reliability"))
        timings = record["timings_s"]
        print(
            f"time: {timings['total']:.1f} s total, {timings['inference']:.1f} s tiles "
            f"({record['tiling']['tiles_with_tissue']} with tissue, {record['tiling']['tiles_resumed']} resumed), "
            f"model {record['execution']['model_forward_s']:.1f} s"
        )
        execution = record["execution"]
        if execution.get("runtime"):
            agreement = execution.get("runtime_agreement")
            checked = f", labels agree with PyTorch fp32 on {agreement:.3%} of the check" if agreement else ""
            print(f"runtime: {', '.join(execution['runtime'])} ({execution.get('runtime_requested')}{checked})")


def _log(message: str) -> None:
    print(f"wsi-espnet: {message}", file=sys.stderr)


class _RunLog(logging.Handler):
    """The last log records of a run, kept in memory and written next to its outputs if the run fails."""

    def __init__(self, capacity: int = 20_000) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def _failure_log(slide: Path, out_dir: Path | None) -> Iterator[None]:
    """On failure, write ``<out>/<slide>.segment.log`` (the run's log and the full traceback) and say where.

    Workers' tracebacks (Dask's "Compute Failed" records) and the exception's own chain go there
    rather than onto the terminal, where one sentence says what went wrong and what to do.
    """
    from wsi_espnet.outputs.paths import OutputPaths

    handler = _RunLog()
    loggers = [logging.getLogger(name) for name in ("wsi_espnet", "distributed")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    except Exception as exc:
        folder = (out_dir or slide.absolute().parent).absolute()
        path = OutputPaths.for_slide(slide, folder).log
        if folder.is_dir():
            with contextlib.suppress(OSError):
                text = "\n".join([*handler.lines, "", *traceback.format_exception(exc)])
                path.write_text(f"wsi-espnet {__version__} {' '.join(sys.argv)}\n{text}")
                exc.add_note(f"the full log, with the traceback for a bug report, is in {path}")
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


class _TileProgressBar:
    """Draws the engine's ``"tiles"`` events as a tqdm bar on stderr, as ``segment`` always has."""

    def __init__(self, *, show: bool) -> None:
        self.show = show
        self.bar: tqdm | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage != "tiles" or not self.show:
            self.close()
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total, initial=event.done, unit="tile", file=sys.stderr, dynamic_ncols=True,
                desc=f"segmenting ({event.detail})",
            )  # fmt: skip
        else:
            self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_segment(slide: Path, model: Path, args: argparse.Namespace) -> int:
    from wsi_espnet.segment_slide import segment_slide

    options = _segment_options(args)
    bar = _TileProgressBar(show=not args.quiet)
    try:
        with _failure_log(slide, options.out_dir):
            result = segment_slide(slide, model, options, on_progress=bar)
    finally:
        bar.close()
    _print_summary(result, quiet=args.quiet)
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    return _run_segment(args.slide, _model_path(args.model), args)


def _batch_pipeline(args: argparse.Namespace) -> Pipeline:
    """The pipeline file (or ``--input``/``--out``), with the flags given on the command line overriding it."""
    import dataclasses

    from wsi_espnet.batch import ClusterSpec, cohort_from_pattern, load_cohort, load_pipeline, pipeline_from_inputs
    from wsi_espnet.segment_slide import FORMATS

    if args.pipeline is not None:
        pipeline = load_pipeline(args.pipeline)
        if args.input is not None:
            text = str(args.input)
            cohort = load_cohort(text) if text.lower().endswith((".yaml", ".yml")) else cohort_from_pattern(text)
            pipeline = pipeline.replace(cohort=cohort)
        if args.out is not None:
            pipeline = pipeline.replace(out_dir=args.out.absolute())
    elif args.input is None or args.out is None:
        raise InputError("give a pipeline file (wsi-espnet batch PIPELINE.yaml), or both --input and --out.")
    else:
        pipeline = pipeline_from_inputs(args.input, args.out)
    changes: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("target_mpp", "tile_size", "halo", "batch_size", "device", "precision", "runtime")
        if getattr(args, name) is not None
    }
    if args.format is not None:
        changes["formats"] = (
            frozenset(FORMATS) if args.format == "all" else frozenset(f.strip() for f in args.format.split(","))
        )
    if args.no_tissue_detection:
        changes["tissue"] = dataclasses.replace(pipeline.options.tissue, enabled=False)
    if args.overwrite:
        changes["overwrite"] = True
    pipeline = pipeline.replace(options=dataclasses.replace(pipeline.options, **changes))
    if args.model is not None:
        pipeline = pipeline.replace(model=str(args.model))
    if args.layout is not None:
        pipeline = pipeline.replace(layout=args.layout)
    if args.concurrent_slides is not None:
        pipeline = pipeline.replace(concurrent_slides=args.concurrent_slides)
    if args.scheduler is not None:
        pipeline = pipeline.replace(cluster=ClusterSpec("scheduler", {"address": args.scheduler}))
    elif args.workers is not None or args.threads_per_worker is not None:
        pipeline = pipeline.replace(cluster=_scaled(pipeline.cluster, args.workers, args.threads_per_worker))
    return pipeline


def _scaled(cluster: ClusterSpec, workers: int | None, threads: int | None) -> ClusterSpec:
    """The pipeline's own cluster with --workers / --threads-per-worker applied: local workers,
    Kubernetes worker pods, or SLURM/PBS jobs (a job's threads are its cores, so that flag is refused)."""
    from wsi_espnet.batch import ClusterSpec

    if cluster.kind == "scheduler":
        raise InputError(
            "--workers and --threads-per-worker size a cluster this command starts, but the pipeline connects to "
            "an existing scheduler; scale that cluster itself, or drop the flags."
        )
    if cluster.kind in ("slurm", "pbs"):
        if threads is not None:
            raise InputError(
                f"--threads-per-worker does not apply to a {cluster.kind} cluster: each worker job has the "
                f"cluster.{cluster.kind}.cores of the pipeline; change cores (and processes) there."
            )
        return ClusterSpec(cluster.kind, {**cluster.settings, "jobs": workers})
    given = {"workers": workers, "threads_per_worker": threads}
    return ClusterSpec(cluster.kind, {**cluster.settings, **{k: v for k, v in given.items() if v is not None}})


def _cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from wsi_espnet.batch import SlideOutcome, run_pipeline

    pipeline = _batch_pipeline(args)
    if args.print_cluster_spec:
        return _print_cluster_spec(pipeline)
    show = not args.quiet
    total = len(pipeline.cohort.slides)
    bar = tqdm(total=total, unit="slide", desc=pipeline.name, file=sys.stderr, dynamic_ncols=True, disable=not show)

    def started(scheduler: str, dashboard: str | None) -> None:
        if show:
            bar.write(f"wsi-espnet: {total} slides on {scheduler}; dashboard: {dashboard or 'none'}", file=sys.stderr)

    def finished(outcome: SlideOutcome) -> None:
        if show:
            line = f"{outcome.status:<9} {outcome.slide.stem} ({outcome.seconds:.1f} s)"
            bar.write(line + (f": {outcome.reason}" if outcome.status != "ok" else ""), file=sys.stderr)
        bar.update(1)

    # segment_slide's own "already complete" notes would repeat the per-slide lines.
    engine_logger = logging.getLogger("wsi_espnet.segment_slide")
    previous = engine_logger.level
    engine_logger.setLevel(logging.WARNING)
    try:
        report = run_pipeline(pipeline, on_start=started, on_slide=finished)
    finally:
        engine_logger.setLevel(previous)
        bar.close()
    csv_path = pipeline.out_dir / f"{report.pipeline}.batch-report.csv"
    if show:
        print(report.summary_table())
        print(f"report: {csv_path} and {csv_path.with_suffix('.json')}")
        if report.counts["skipped"] == total:
            print("nothing to do: every slide was already complete (pass --overwrite to recompute).")
    return PARTIAL_FAILURE if report.failed else 0


def _print_cluster_spec(pipeline: Pipeline) -> int:
    """Print what the pipeline would start: a Kubernetes DaskCluster manifest (for ``kubectl apply -f -``)
    or a SLURM/PBS worker job script; nothing is run or submitted."""
    import yaml

    from wsi_espnet.batch.clusters import job_script
    from wsi_espnet.batch.kubernetes import check_cluster_spec, kubernetes_cluster_spec
    from wsi_espnet.batch.run import JOB_LOG_FOLDER

    kind = pipeline.cluster.kind
    if kind in ("slurm", "pbs"):
        print(job_script(pipeline.cluster, job_log_directory=pipeline.out_dir / JOB_LOG_FOLDER), end="")
        return 0
    if kind != "kubernetes":
        where = f"pipeline {str(pipeline.source)!r}" if pipeline.source else "this batch job"
        raise InputError(
            f"--print-cluster-spec prints a Kubernetes DaskCluster or a SLURM/PBS job script, but {where} runs on "
            f"a {kind!r} cluster, which has neither; give a pipeline with cluster: kubernetes, slurm or pbs "
            "(e.g. pipelines/kubernetes-example.yaml)."
        )
    manifest = kubernetes_cluster_spec(pipeline.cluster.settings, name=pipeline.name)
    check_cluster_spec(manifest)
    print(f"# DaskCluster of pipeline {pipeline.name!r} (wsi-espnet {__version__}); apply with: kubectl apply -f -")
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from wsi_espnet.devices import resolve
    from wsi_espnet.inference.predict_images import predict_image_files
    from wsi_espnet.models import load_model

    placement = resolve(args.device, "fp32")
    model, config = load_model(_model_path(args.model), device=placement.device)
    if config.target_mpp is not None and args.mpp is None:
        _log(f"the model expects {config.target_mpp:g} um/px; images are used as they are (pass --mpp to resample)")
    for result in predict_image_files(
        model, config, args.images, args.out, mpp=args.mpp, alpha=args.alpha, runtime=args.runtime
    ):
        shares = sorted(zip(result.class_fractions, config.class_names, strict=True), reverse=True)
        classes = ", ".join(f"{name} {share:.1%}" for share, name in shares if share >= 0.0005)
        resampled = f" (segmented at x{result.scale:.3g})" if result.scale != 1.0 else ""
        print(f"{result.source}: {result.labels_path}, {result.overlay_path}{resampled}; {classes}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from wsi_espnet.training.recipe import load_recipe
    from wsi_espnet.training.train import TrainOptions, train

    recipe = load_recipe(args.recipe).replace(
        stages=None if args.stages is None else [s.strip() for s in args.stages.split(",") if s.strip()],
        encoder_epochs=args.encoder_epochs,
        decoder_epochs=args.decoder_epochs,
        batch_size=args.batch_size,
        crop_size=args.crop,
        samples_per_epoch=args.samples_per_epoch,
        lr=args.lr,
        init=None if args.init is None else str(args.init),
        seed=args.seed,
        num_workers=args.num_workers,
    )
    out = args.out or Path("runs") / (args.name or args.manifest.stem)
    options = TrainOptions(
        manifest=args.manifest,
        out=out,
        recipe=recipe,
        name=args.name,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        tensorboard=args.tensorboard,
    )
    result = train(options, log=_log)
    val = result.metrics["evaluations"].get("val")
    if val is not None:
        from wsi_espnet.evaluation import format_metrics_table

        print(f"validation of {result.model_path}:")
        print(format_metrics_table(val))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from wsi_espnet.datasets.manifest import load_manifest
    from wsi_espnet.devices import resolve
    from wsi_espnet.evaluation import format_metrics_table
    from wsi_espnet.evaluation.evaluate import evaluate_split, write_evaluation
    from wsi_espnet.models import load_model

    placement = resolve(args.device, "fp32")
    manifest = load_manifest(args.manifest)
    manifest.check_split(args.split)
    model, config = load_model(_model_path(args.model), num_classes=args.num_classes)
    model = model.to(placement.torch_device)
    confusion = evaluate_split(model, config, manifest, args.split, progress=not args.quiet)
    out = args.out or Path(".")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot use {str(out)!r} as the output folder: {exc.strerror}.") from exc
    prefix = f"{config.name}_{manifest.name}_"
    metrics = write_evaluation(
        confusion, config, manifest, args.split, out, prefix=prefix, extra={"model": str(args.model or "packaged")}
    )
    print(f"{config.name} on {manifest.name} / {args.split} (one confusion matrix over every pixel, ignore excluded):")
    print(format_metrics_table(metrics))
    print(f"wrote {out / f'{prefix}evaluation_{args.split}.json'} and {out / f'{prefix}confusion_{args.split}.png'}")
    return 0


def _crop(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH (e.g. 512x512)") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH (e.g. 512x512)")
    return values[0], values[1]


def _cmd_demo(args: argparse.Namespace) -> int:
    from wsi_espnet.demo import demo_model, sample_slide

    slide = sample_slide(log=_log)
    model, target_mpp = demo_model(log=_log)
    args.target_mpp = args.target_mpp or target_mpp
    args.out = args.out or Path("wsi-espnet-demo")
    return _run_segment(slide, model, args)


def _model_path(model: Path | None) -> Path:
    """``--model``: a checkpoint path or a packaged model's name; none -> the default breast model."""
    from wsi_espnet.models.registry import resolve_model_path

    return resolve_model_path(model)


def _add_segment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: next to the slide)")
    parser.add_argument(
        "--format", default="ome-zarr,ome-tiff,provenance",
        help="comma-separated outputs from ome-zarr, ome-tiff, geojson, provenance, or 'all' "
        "(default: ome-zarr,ome-tiff,provenance)",
    )  # fmt: skip
    parser.add_argument("--mpp", type=float, default=None, help="the slide's micrometres per pixel (for files without)")
    parser.add_argument("--target-mpp", type=float, default=None, help="run the model at this um/px (default: model's)")
    parser.add_argument("--tile-size", type=int, default=1536, help="output tile side in pixels (default 1536)")
    parser.add_argument("--halo", type=int, default=None, help="context pixels around tiles (default: from the model)")
    parser.add_argument("--batch-size", type=int, default=1, help="tiles per model call (default 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    parser.add_argument("--no-tissue-detection", action="store_true", help="segment the whole slide, glass included")
    parser.add_argument("--tissue-threshold", type=float, default=None, help="saturation threshold 0-1 (default Otsu)")
    parser.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--workers", type=int, default=None, help="threads of the local scheduler (default: cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def _image_side(text: str) -> int:
    from wsi_espnet.models.espnet import TOTAL_STRIDE

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0 or value % TOTAL_STRIDE:
        raise argparse.ArgumentTypeError(f"{value} must be a positive multiple of {TOTAL_STRIDE}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-espnet",
        description="Segment gigapixel whole-slide images with ESPNet.",
        epilog="Exit codes: 0 ok (or already complete), 1 internal error, 2 bad input or usage, 3 bad checkpoint, "
        "4 (batch) some slides failed, 130 interrupted (rerun to resume).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list model variants with parameters and multiply-adds")
    models.add_argument("--height", type=_image_side, default=512, help="image height (default 512)")
    models.add_argument("--width", type=_image_side, default=1024, help="image width (default 1024)")
    models.add_argument("--num-classes", type=int, default=None, help="count for this many classes (default 20)")
    models.set_defaults(run=_cmd_models)

    convert = commands.add_parser(
        "convert-weights", help="convert an original ESPNet .pth checkpoint to wsi-espnet .safetensors"
    )
    convert.add_argument("input", type=Path, help="original checkpoint, e.g. decoder_espnet_p_2_q_8.pth")
    convert.add_argument("output", type=Path, help="output file, e.g. espnet-cityscapes.safetensors")
    convert.add_argument(
        "--dataset", choices=["cityscapes", "camvid"], default=None, help="training set (default: from class count)"
    )
    convert.add_argument("--num-classes", type=int, default=None, help="fail unless the file has this many classes")
    convert.add_argument("--name", default=None, help="model name to record (default: the input file's stem)")
    convert.set_defaults(run=_cmd_convert_weights)

    export = commands.add_parser("export", help="export a checkpoint for other runtimes")
    export.add_argument("model", type=Path, help="a .safetensors checkpoint (or an original .pth)")
    export.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="write ONNX with dynamic batch and size")
    export.add_argument("--height", type=_image_side, default=512, help="tracing height (default 512)")
    export.add_argument("--width", type=_image_side, default=1024, help="tracing width (default 1024)")
    export.set_defaults(run=_cmd_export)

    segment = commands.add_parser("segment", help="segment a whole-slide image into a pyramidal class mask")
    segment.add_argument("slide", type=Path, help="slide file (.svs .tif .ndpi .mrxs ...) or DICOM WSI folder")
    segment.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint (default: packaged)")
    _add_segment_options(segment)
    segment.set_defaults(run=_cmd_segment)

    batch = commands.add_parser(
        "batch", help="segment every slide of a cohort on one Dask cluster, with a CSV/JSON report",
        description="Run a pipeline file, or --input (a cohort manifest, a folder or a glob) with --out. Flags "
        "override the pipeline's values. Exit codes: 0 every slide done (or already complete), 4 some slides "
        "failed (see the report), 2 bad pipeline or manifest, 3 bad checkpoint, 130 interrupted.",
    )  # fmt: skip
    batch.add_argument("pipeline", type=Path, nargs="?", help="a pipeline file, e.g. pipelines/local-example.yaml")
    batch.add_argument("--input", default=None, help="a cohort manifest (.yaml), a folder of slides or a glob")
    batch.add_argument("--out", type=Path, default=None, help="output folder (the report goes there too)")
    batch.add_argument("--model", default=None, help="a .safetensors checkpoint or a packaged name (default: packaged)")
    batch.add_argument("--layout", choices=["flat", "per-slide"], default=None, help="flat (default) or per-slide")
    batch.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786")
    batch.add_argument(
        "--workers", type=int, default=None,
        help="worker processes of the local cluster, worker pods on Kubernetes, or jobs on SLURM/PBS",
    )  # fmt: skip
    batch.add_argument("--threads-per-worker", type=int, default=None, help="threads per local worker (default 1)")
    batch.add_argument("--concurrent-slides", type=int, default=None, help="slides driven at once (default 2)")
    batch.add_argument("--format", default=None, help="comma-separated outputs, or 'all' (default: the pipeline's)")
    batch.add_argument("--target-mpp", type=float, default=None, help="run the model at this um/px")
    batch.add_argument("--tile-size", type=int, default=None, help="output tile side in pixels (default 1536)")
    batch.add_argument("--halo", type=int, default=None, help="context pixels around tiles (default: from the model)")
    batch.add_argument("--batch-size", type=int, default=None, help="tiles per model call (default 1)")
    batch.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto)")
    batch.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "bf16"])
    batch.add_argument("--runtime", default=None, choices=RUNTIMES, help=RUNTIME_HELP)
    batch.add_argument("--no-tissue-detection", action="store_true", help="segment whole slides, glass included")
    batch.add_argument("--overwrite", action="store_true", help="recompute slides that are already complete")
    batch.add_argument("--quiet", action="store_true", help="no progress bar, no per-slide lines, no summary")
    batch.add_argument(
        "--print-cluster-spec", action="store_true",
        help="print the Kubernetes DaskCluster (YAML, for kubectl apply -f -) or the SLURM/PBS worker job script "
        "the pipeline would start, and exit; runs nothing",
    )  # fmt: skip
    batch.set_defaults(run=_cmd_batch)

    predict = commands.add_parser("predict", help="segment ordinary image files into label and overlay PNGs")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="PNG, JPEG or TIFF image files")
    predict.add_argument("--model", type=Path, default=None, help=".safetensors or .pth checkpoint (default: packaged)")
    predict.add_argument("--out", type=Path, required=True, help="output folder for NAME.labels.png, NAME.overlay.png")
    predict.add_argument("--mpp", type=float, default=None, help="the images' um/px (resampled to the model's)")
    predict.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours (default 0.5)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    predict.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    predict.set_defaults(run=_cmd_predict)

    train = commands.add_parser("train", help="train ESPNet on a dataset manifest with MONAI engines")
    train.add_argument("manifest", type=Path, help="dataset manifest (.yaml), e.g. data_manifests/camvid.yaml")
    train.add_argument("--recipe", default=None, help="recipe YAML or packaged name (default: paper)")
    train.add_argument("--out", type=Path, default=None, help="run folder (default: runs/NAME)")
    train.add_argument("--name", default=None, help="model name (default: espnet-MANIFEST)")
    train.add_argument("--init", type=Path, default=None, help="start from these weights (any class set)")
    train.add_argument("--stages", default=None, help="encoder,decoder (paper), encoder or decoder")
    train.add_argument("--encoder-epochs", type=int, default=None)
    train.add_argument("--decoder-epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--crop", type=_crop, default=None, metavar="HxW", help="training crop, e.g. 512x512")
    train.add_argument("--samples-per-epoch", type=int, default=None, help="draw this many crops per epoch")
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--num-workers", type=int, default=None, help="data loader processes (default 0)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    train.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    train.add_argument("--tensorboard", action="store_true", help="also log to OUT/<stage>/tensorboard")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="per-class IoU, mIoU and pixel accuracy on a manifest split")
    evaluate.add_argument("manifest", type=Path, help="dataset manifest (.yaml)")
    evaluate.add_argument("--split", default="val", help="split to evaluate (default val)")
    evaluate.add_argument("--model", type=Path, default=None, help=".safetensors or original .pth (default: packaged)")
    evaluate.add_argument("--num-classes", type=int, default=None, help="for original .pth files")
    evaluate.add_argument("--out", type=Path, default=None, help="folder for the JSON and PNG (default: here)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_cmd_evaluate)

    info = commands.add_parser("info", help="describe a slide: vendor, levels, MPP, associated images")
    info.add_argument("slide", type=Path)
    info.add_argument("--mpp", type=float, default=None, help="override the slide's micrometres per pixel")
    info.set_defaults(run=_cmd_info)

    demo = commands.add_parser("demo", help="segment the CC0 OpenSlide sample slide CMU-1-Small-Region.svs")
    _add_segment_options(demo)
    demo.set_defaults(run=_cmd_demo)
    return parser


class _StderrFormatter(logging.Formatter):
    """``wsi-espnet: message`` (``wsi-espnet: warning: ...`` for warnings), options spelled as flags."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"wsi-espnet: {level}{render_options(record.getMessage(), cli=True)}"


@contextlib.contextmanager
def _library_logging() -> Iterator[None]:
    """The library's log records (``wsi_espnet.*``) on stderr while a command runs."""
    logger = logging.getLogger("wsi_espnet")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    with _library_logging():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # so a closed pipe is reported here, not at interpreter exit
        return code
    except WsiEspnetError as exc:
        print(f"wsi-espnet: error: {exc.cli_message()}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"wsi-espnet: {note}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        hint = "rerun with --resume to continue" if args.command == "train" else "rerun the same command to resume"
        print(f"wsi-espnet: interrupted; {hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
