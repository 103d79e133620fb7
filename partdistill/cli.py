"""The `partdistill` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from partdistill.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="PartDistillation as a staged, resumable pipeline.")
console = Console(stderr=True)

DEFAULT_CONFIG = "configs/demo_partsworld.py"
EXIT_CONFIG, EXIT_NOT_BUILT, EXIT_VERIFY = 2, 3, 4

ConfigArg = Annotated[Path, typer.Argument(help="mmengine Python config, e.g. configs/demo_partsworld.py")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="artifact store root (default: runtime.store)")]
OptionsOpt = Annotated[list[str] | None, typer.Option(
    "--cfg-options", "-o", help="override a setting, key=value (repeatable), e.g. -o mining.k=6")]


def _load(config: Path, cfg_options: list[str] | None) -> dict:
    try:
        return load_config(config, cfg_options)
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def run(
    config: ConfigArg = Path(DEFAULT_CONFIG),
    until: Annotated[str | None, typer.Option(help="run this stage and the stages it needs")] = None,
    only: Annotated[str | None, typer.Option(help="run just this stage (its inputs must exist)")] = None,
    store: StoreOpt = None,
    cfg_options: OptionsOpt = None,
    engine: Annotated[str, typer.Option(help="'prefect' (a flow run, ephemeral API unless "
                                             "PREFECT_API_URL is set) or 'local' (a plain loop)")] = "prefect",
) -> None:
    """Run the pipeline; stages whose artifact version is complete are skipped."""
    from partdistill import pipeline
    from partdistill.progress import RichProgress

    cfg = _load(config, cfg_options)
    try:
        pipeline.select(pipeline.plan(cfg), until, only)
    except pipeline.PipelineError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(EXIT_CONFIG) from None
    if engine not in ("local", "prefect"):
        console.print(f"[red]--engine must be 'prefect' or 'local', got {engine!r}[/red]")
        raise typer.Exit(EXIT_CONFIG)
    start = time.monotonic()
    try:
        with RichProgress() as progress:
            if engine == "local":
                outcomes = [o.as_dict() for o in pipeline.run_pipeline(
                    cfg, pipeline.store_for(cfg, store), until, only, progress)]
            else:
                import os

                # Prefect's own run log ("Created task run", "Finished in state Completed()") stays in the
                # UI; the terminal shows its warnings and errors only, beside the stage progress bars
                os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
                from partdistill.flows import pipeline as flows

                flows.TERMINAL_PROGRESS = progress
                console.print("[dim]starting a Prefect flow run (the ephemeral API server may take a while "
                              "to start on a busy machine)[/dim]")
                outcomes = flows.pipeline_flow(str(config), until, only, store, cfg_options)
    except NotImplementedError as err:
        console.print(f"\n[yellow]Pipeline stopped: {err}[/yellow]")
        _print_status(cfg, store)
        raise typer.Exit(EXIT_NOT_BUILT) from None
    except pipeline.PipelineError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    except _input_errors() as err:
        # bad input that a stage named (a data set, a checkpoint, features gone NaN): the message
        # says which file and what to do; a traceback would only bury it
        console.print(f"[red]{type(err).__name__}: {err}[/red]")
        _print_status(cfg, store)
        raise typer.Exit(1) from None
    for o in outcomes:
        console.print(f"  {o['stage']:<12} {o['version']}  {o['state']:<9} {o['seconds']:7.1f} s", soft_wrap=True)
    console.print(f"done in {time.monotonic() - start:.1f} s")
    evaluated = [o for o in outcomes if o["stage"] == "evaluate"]
    if evaluated:
        path = Path(evaluated[-1]["path"])
        # the table goes to stdout (it is the run's result); progress and status went to stderr
        print("\n" + (path / "table.md").read_text())
        console.print(f"report: {(path / 'report.html').resolve()}")


def _input_errors() -> tuple[type[BaseException], ...]:
    from partdistill.data.images import DatasetError, ImageLoadError
    from partdistill.models.teacher import CheckpointError
    from partdistill.stages.proposals import NoTrainingData

    return (DatasetError, ImageLoadError, CheckpointError, NoTrainingData, FloatingPointError)


def _print_status(cfg: dict, store: str | None) -> None:
    from partdistill import pipeline

    st = pipeline.store_for(cfg, store)
    table = Table(title=f"artifact store {st.root.resolve()}")
    for col in ("stage", "version", "state", "size", "files", "created"):
        table.add_column(col, no_wrap=True)
    for row in pipeline.status(cfg, st):
        size = _human(row["bytes"]) if row["bytes"] is not None else ""
        colour = {"complete": "green", "missing": "dim", "not built yet": "yellow"}.get(row["state"], "cyan")
        table.add_row(row["stage"], row["version"], f"[{colour}]{row['state']}[/{colour}]", size,
                      str(row["files"] or ""), (row["created"] or "")[:16].replace("T", " "))
    Console(width=max(Console().width, 100)).print(table)


@app.command()
def status(config: ConfigArg = Path(DEFAULT_CONFIG), store: StoreOpt = None, cfg_options: OptionsOpt = None) -> None:
    """A table of the config's stages: version, state, size and creation time in the store."""
    _print_status(_load(config, cfg_options), store)


@app.command()
def verify(
    store: Annotated[Path, typer.Option("--store", help="artifact store root")] = Path("store"),
    stage: Annotated[str | None, typer.Option(help="only this stage")] = None,
) -> None:
    """Check every artifact's files against its manifest checksums."""
    from partdistill.storage import ArtifactStore

    st = ArtifactStore(store)
    problems = st.verify(stage)
    n = sum(len(st.versions(s)) for s in ([stage] if stage else st.stages()))
    for p in problems:
        console.print(f"[red]{p}[/red]")
    if problems:
        console.print(f"[red]{len(problems)} problem(s) in {n} artifact(s) under {store}[/red]")
        raise typer.Exit(EXIT_VERIFY)
    Console().print(f"{n} artifact(s) under {store} verified: every file matches its manifest")


@app.command()
def gc(
    store: Annotated[Path, typer.Option("--store", help="artifact store root")] = Path("store"),
    older_than: Annotated[float, typer.Option(help="only partial folders untouched for this many hours")] = 0.0,
    keep: Annotated[list[Path] | None, typer.Option(
        "--keep", help="also remove complete versions that none of these configs uses (repeatable)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, remove nothing")] = False,
) -> None:
    """Remove stale partial artifacts (killed runs' leftovers that no run is writing).

    A partial folder is what a rerun of that version resumes from: remove it once you will not
    rerun it. With --keep CONFIG, complete versions no given config plans are removed too."""
    from partdistill import pipeline
    from partdistill.storage import ArtifactStore

    keep_set = None
    if keep:
        keep_set = {(p.name, p.version) for c in keep for p in pipeline.plan(_load(c, None))}
    items = ArtifactStore(store).gc(older_than * 3600, keep_set, dry_run)
    out = Console()
    for it in items:
        colour = "dim" if it.action == "kept" else "yellow"
        out.print(f"[{colour}]{it.action:<12}[/{colour}] {it.path}  {_human(it.bytes)}  ({it.reason})", soft_wrap=True)
    freed = sum(it.bytes for it in items if it.action != "kept")
    out.print(f"{'would free' if dry_run else 'freed'} {_human(freed)} in "
              f"{sum(it.action != 'kept' for it in items)} folder(s) under {store}")


@app.command()
def partsworld(
    out: Annotated[Path, typer.Option(help="output folder")],
    images: Annotated[int, typer.Option(help="number of images")] = 64,
    seed: Annotated[int, typer.Option(help="random seed; same seed, same bytes")] = 0,
    width: Annotated[int, typer.Option()] = 256,
    height: Annotated[int, typer.Option()] = 192,
) -> None:
    """Write the synthetic Parts World data set (images, object JSON, part JSON, splits)."""
    from rich.progress import Progress

    from partdistill.data import partsworld as pw

    cfg = pw.PartsWorldConfig(images=images, seed=seed, width=width, height=height)
    with Progress(console=console) as progress:
        tid = progress.add_task("rendering Parts World", total=images)
        summary = pw.write_partsworld(out, cfg, progress=lambda n: progress.update(tid, completed=n))
    pw.preview(out, out / "preview.png", n=min(6, images))
    Console().print(summary)
    Console().print(f"wrote {out} (preview: {out / 'preview.png'})")


@app.command()
def predict(
    out: Annotated[Path, typer.Option(help="output folder: predictions.json and overlays/")],
    images: Annotated[list[Path] | None, typer.Argument(help="image files or folders (searched recursively for "
                                                             ".jpg .jpeg .png .bmp .webp)")] = None,
    coco: Annotated[Path | None, typer.Option(help="predict the images of this COCO JSON instead, keeping their "
                                                   "image ids")] = None,
    image_root: Annotated[Path | None, typer.Option(help="the folder the --coco JSON's relative file names are "
                                                         "relative to (default: the JSON's folder)")] = None,
    gt_objects: Annotated[bool, typer.Option("--gt-objects", help="segment the --coco JSON's object masks (the "
                                                                  "GT-object setting) instead of the teacher's "
                                                                  "objects")] = False,
    model: Annotated[str | None, typer.Option(
        help="distill artifact: its folder (STORE/distill_r1/<version>), distill_rN/<version> or distill_rN "
             "(default: the newest distill_r* artifact in the store)")] = None,
    store: Annotated[Path, typer.Option("--store", help="artifact store root")] = Path("store"),
    device: Annotated[str, typer.Option(help="'cpu' or 'cuda'")] = "cpu",
    score_threshold: Annotated[float | None, typer.Option(help="keep parts scoring above this "
                                                               "(default: the model's distill.label)")] = None,
    mask_threshold: Annotated[float | None, typer.Option(help="binarise part masks above this "
                                                              "(default: the model's distill.label)")] = None,
    min_fraction: Annotated[float | None, typer.Option(help="drop parts under this fraction of their object "
                                                            "(default: the model's distill.label)")] = None,
) -> None:
    """Segment the parts of the objects in new images with a trained distill model."""
    from partdistill.data.images import DatasetError
    from partdistill.models.teacher import CheckpointError
    from partdistill.predict import ModelNotFound, Predictor, coco_input, find_images, write_predictions
    from partdistill.progress import RichProgress

    if (coco is None) == (not images):
        console.print("[red]give image files or folders, or --coco JSON (not both)[/red]")
        raise typer.Exit(EXIT_CONFIG)
    if gt_objects and coco is None:
        console.print("[red]--gt-objects takes the objects of a --coco JSON[/red]")
        raise typer.Exit(EXIT_CONFIG)
    given = None
    if coco is not None:
        try:
            given = coco_input(coco, image_root, with_objects=gt_objects)
        except DatasetError as err:
            console.print(f"[red]{err}[/red]", soft_wrap=True)
            raise typer.Exit(EXIT_CONFIG) from None
        paths, missing = given.paths, []
    else:
        paths, missing = find_images(images)
    for path, reason in missing:
        console.print(f"[red]{path}: {reason}[/red]")
    if not paths:
        console.print(f"[red]no images found in {', '.join(map(str, images or [coco]))}[/red]")
        raise typer.Exit(1)
    try:
        thresholds = {"score_threshold": score_threshold, "mask_threshold": mask_threshold,
                      "min_fraction": min_fraction}
        predictor = Predictor.from_store(store, model, device,
                                         **{k: v for k, v in thresholds.items() if v is not None})
    except (ModelNotFound, CheckpointError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(EXIT_CONFIG) from None
    console.print(f"model {predictor.description}, {len(paths)} image(s)", soft_wrap=True)
    start = time.monotonic()
    with RichProgress() as progress, progress.task("predict", total=len(paths)) as bar:
        def on_image(pred) -> None:
            if pred.error is not None:
                console.print(f"[red]skipped {pred.path}: {pred.error}[/red]", soft_wrap=True)
            bar.advance(1)

        summary = write_predictions(predictor, paths, out, on_image,
                                    image_ids=given.image_ids if given is not None else None,
                                    objects=given.objects if given is not None else None)
    failed = len(summary.failed) + len(missing)
    console.print(f"{summary.images} image(s): {summary.objects} object(s), {summary.parts} part(s) "
                  f"in {time.monotonic() - start:.1f} s; {failed} failed", soft_wrap=True)
    Console().print(f"wrote {summary.path} and {out / 'overlays'}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def score(
    predictions: Annotated[Path, typer.Argument(help="part results: a COCO results list "
                                                     "([{image_id, category_id, segmentation, score}]) or a "
                                                     "predictions.json of `predict` or of the evaluate stage")],
    parts: Annotated[Path, typer.Option(help="part ground truth: COCO part JSON, each part's object_id naming "
                                             "its object and each part category's supercategory its class")],
    instances: Annotated[Path, typer.Option(help="the objects' COCO instance JSON")],
    out: Annotated[Path | None, typer.Option(help="also write the metrics here, as JSON")] = None,
) -> None:
    """Score a part-results file with the evaluate stage's metrics (AR@k, C-/A-mIoU, FG-NMI/ARI,
    NMI/ARI within objects), so that any method can be compared side by side."""
    from partdistill.data.images import DatasetError
    from partdistill.evaluation.score import dumps, results_table, score_file

    try:
        metrics = score_file(predictions, parts, instances)
    except DatasetError as err:
        console.print(f"[red]{err}[/red]", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"{metrics['objects']} object(s) with parts, {metrics['predicted']} with a prediction; "
                  f"{metrics['unmatched_results']} result(s) on no object", soft_wrap=True)
    print(results_table(metrics, predictions.name))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dumps(metrics) + "\n")
        console.print(f"wrote {out}")


@app.command()
def finetune(
    fraction: Annotated[float, typer.Option(help="fraction of the labelled train images, in (0, 1]; e.g. 0.01")],
    init: Annotated[str, typer.Option(help="start from 'distill' (the distilled part model) or 'teacher' "
                                           "(the baseline)")],
    store: Annotated[Path, typer.Option("--store", help="artifact store root")] = Path("store"),
    distill: Annotated[str | None, typer.Option(
        help="distill artifact: distill_rN/<version>, distill_rN or its folder (default: the newest); its "
             "data and teacher are used for both inits")] = None,
    iters: Annotated[int, typer.Option(help="training iterations")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the image subset and of the training")] = 0,
    out: Annotated[Path | None, typer.Option(help="output folder (default: finetune/{init}_{fraction}_seed{seed})")]
    = None,
    device: Annotated[str, typer.Option(help="'cpu' or 'cuda'")] = "cpu",
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default: the distill stage's)")] = None,
) -> None:
    """Few-shot fine-tuning on labelled parts (paper Table 4), scored on the val split."""
    from partdistill.finetune import FinetuneError
    from partdistill.finetune import finetune as run_finetune
    from partdistill.progress import RichProgress

    try:
        with RichProgress() as progress:
            done = run_finetune(store, fraction, init, distill, iters, seed, out, device, lr, progress)
    except FinetuneError as err:
        console.print(f"[red]{err}[/red]", soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    m = done.metrics
    Console().print(f"{m['init']} init, {m['images']} of {m['labelled_images']} labelled image(s) "
                    f"({100 * m['fraction']:g}%), {m['iters']} iterations: AR@200 {100 * m['AR@200']:.1f}, "
                    f"mIoU {100 * m['mIoU']:.1f}, C-mIoU {100 * m['C-mIoU']:.1f} in {m['seconds']:.0f} s",
                    soft_wrap=True)
    Console().print(f"wrote {done.out / 'metrics.json'} and {done.out / 'checkpoint.pth'}", soft_wrap=True)


@app.command()
def serve(
    config: ConfigArg = Path(DEFAULT_CONFIG),
    store: StoreOpt = None,
    cfg_options: OptionsOpt = None,
    port: Annotated[int, typer.Option(help="port of the Prefect server started here, on 127.0.0.1 only "
                                           "(when PREFECT_API_URL is not set or does not answer)")] = 4200,
    limit: Annotated[int, typer.Option(help="most flow runs at a time (0: no limit)")] = 1,
) -> None:
    """The Prefect UI and the pipeline as deployments: partdistill/pipeline and one per stage.

    Uses the server at PREFECT_API_URL if it answers, else starts `prefect server start --host
    127.0.0.1` (stopped on exit). CONFIG, --store and -o become the deployments' default parameters.
    """
    from partdistill import pipeline
    from partdistill.flows.serve import ServeError
    from partdistill.flows.serve import serve as serve_deployments

    cfg = _load(config, cfg_options)
    try:
        pipeline.plan(cfg)
        serve_deployments(config, cfg, store, cfg_options, port=port, limit=limit or None,
                          echo=lambda line: Console(soft_wrap=True).print(line, highlight=False, markup=False))
    except (ServeError, pipeline.PipelineError) as err:
        console.print(f"[red]{err}[/red]", soft_wrap=True)
        raise typer.Exit(1) from None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
