"""Command line: ``delf-retrieval extract | recognize | retrieve | clean | evaluate | validate | demo | index | predict | serve``.

Exit codes: 0 success; 1 a submission was written or checked and is invalid; 2 the
command could not do its work (bad input, missing file, disk full, store in use, every
Ray worker lost; one line on stderr says what); 3 an internal error (a bug: the traceback
is printed); 130 interrupted by Ctrl-C (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from delf_retrieval import __version__, distributed
from delf_retrieval.cli.predict import check_match_device, run_predict
from delf_retrieval.config import Config, default_preset, load_config, parse_override
from delf_retrieval.core.atomic import regular_target
from delf_retrieval.core.errors import DelfError
from delf_retrieval.demo.run import run_demo
from delf_retrieval.distributed import RayRunner
from delf_retrieval.distributed.clean import RayChunkRunner
from delf_retrieval.features.images import list_images
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.kaggle.dataset import KaggleData
from delf_retrieval.kaggle.metrics import (
    answer_correctness,
    evaluate_calibration,
    evaluate_recognition,
    evaluate_retrieval,
    reliability_bins,
)
from delf_retrieval.kaggle.submission import validate_submission
from delf_retrieval.models import extract, loader
from delf_retrieval.models.composite import CompositeExtractor
from delf_retrieval.models.keras_model import is_keras_file
from delf_retrieval.models.presets import extraction_params
from delf_retrieval.scoring.classifier import Classifier, load_classifier, read_class_mapping
from delf_retrieval.service.http import ServeSettings, serve
from delf_retrieval.tasks import recognition, retrieval
from delf_retrieval.tasks.build_index import build_index, check_index_folder
from delf_retrieval.tasks.clean import clean_dataset
from delf_retrieval.viz import plot_reliability

EXIT_OK = 0
EXIT_INVALID_SUBMISSION = 1
EXIT_ERROR = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
# What a user can act on: one line and EXIT_ERROR, no traceback.
USER_ERRORS = (ValueError, OSError, ImportError, DelfError)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_from(text, 1)


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_from(text, 0)


def _int_from(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` are refused, naming the flag)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port, 0..65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return value


def _writable_folder(folder: Path, what: str) -> None:
    """Raise ValueError unless files can be created in ``folder`` (probed with a real file:
    permission bits say nothing on a read-only mount or for root)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".delf-write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"cannot write {what} in {folder}: {error.strerror or error}") from None


def check_output_file(path: Path, what: str = "the submission") -> None:
    """Check before any work that ``path`` can be written as a file."""
    if path.is_dir():
        raise ValueError(f"-o {path} is a directory; give a file name, e.g. {path / 'submission.csv'}")
    path = regular_target(path)  # a link is written through; a device or a pipe is refused
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {what} {path}: folder {parent} does not exist")
    _writable_folder(parent, what)


def check_output_folder(path: Path, what: str) -> None:
    """Check before any work that ``path`` is (or can be created as) a writable folder."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is not a folder")
    _writable_folder(existing, what)


def _default_model() -> str:
    return loader.default_model()


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model: 'opencv-sift' (no weights), 'aliked', 'disk' or 'xfeat' (learned, extra [learned]), "
        "a DELG/DELF SavedModel folder, a TF-Hub "
        "handle cached in TFHUB_CACHE_DIR, or your own Keras/TF model (.keras, .h5, SavedModel "
        "folder; see docs/own_model.md) (default: xfeat when the [learned] extra is installed, "
        "else opencv-sift; $DELF_RETRIEVAL_DEFAULT_MODEL pins it)",
    )
    parser.add_argument("--global-model", default=None, help="with --local-model: global descriptors from this model")
    parser.add_argument("--local-model", default=None, help="with --global-model: local features from this model")
    keras = parser.add_argument_group("Keras/TF model options (your own model; all go into the store fingerprint)")
    keras.add_argument("--layer", default=None, help="descriptor layer (SavedModel: output name); default: input of the final softmax layer, else the model output")
    keras.add_argument("--pooling", choices=("gem", "max", "avg"), default=None, help="pooling of a 4-D layer output (default gem)")
    keras.add_argument("--gem-p", type=_positive_float, default=None, help="GeM exponent (default 3)")
    keras.add_argument(
        "--preprocess", choices=("caffe", "torch", "tf", "0-1", "0-255"), default=None,
        help="pixel preprocessing (default caffe, as Keras ResNet50/VGG16)",
    )
    keras.add_argument("--image-size", type=int, nargs="+", default=None, metavar="PX", help="input size: S or H W (default: the model's, else 224)")
    keras.add_argument("--resize", choices=("fixed", "longest"), default=None, help="fixed size, or cap the longer side keeping the aspect (default fixed)")
    keras.add_argument("--global-scales", type=_positive_float, nargs="+", default=None, help="scales whose global descriptors are averaged (default 1.0)")
    keras.add_argument("--flip", action="store_true", help="also average the horizontally mirrored image")
    keras.add_argument("--model-batch-size", type=_positive_int, default=None, help="images per model call (default 32)")
    keras.add_argument("--head", default=None, help="SavedModel: output holding class probabilities")
    parser.add_argument("--max-image-size", type=_positive_int, default=None, help="cap the longer image side (pixels)")
    parser.add_argument("--max-features", type=_positive_int, default=None, help="max local features per image")
    parser.add_argument(
        "--scales", type=_positive_float, nargs="+", default=None, help="image scales for local features"
    )
    parser.add_argument("--score-threshold", type=_finite_float, default=None, help="min attention score")
    parser.add_argument(
        "--extraction-preset",
        default=None,
        help="extraction settings of a reference pipeline: kaggle2020, delg-r50-gldv2clean, "
        "delg-r101-gldv2clean, delf-hub-tutorial (default: the config's EXTRACTION_PRESET, else "
        "the model's defaults); --scales etc. override it",
    )
    parser.add_argument(
        "--exif-transpose",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rotate photos by their EXIF orientation (default: on, off in the reference presets)",
    )
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float16", help="stored descriptors")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per atomic store chunk")
    parser.add_argument("--threads", type=_positive_int, default=2, help="image decoding threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_ray_arguments(parser: argparse.ArgumentParser, *, shards: bool) -> None:
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run extraction (and, with --shards, search) on Ray: 'local' (start Ray here), 'auto' (the cluster joined with `ray start`), "
        "HOST:PORT or ray://HOST:10001 (see docs/ray.md)",
    )
    parser.add_argument(
        "--ray-workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="Ray extraction actors (default: one per GPU, else one per CPU); CPUs of a --ray local start",
    )
    if shards:
        parser.add_argument("--shards", type=_positive_int, default=1, metavar="N", help="with --ray: exact search split over N actors")


def _ray_hooks(args: argparse.Namespace, extractor):
    """Context giving recognize/retrieve/clean their Ray ``runner`` (or nothing)."""

    if args.shards > 1 and not args.ray:
        raise ValueError("--shards needs --ray")
    if not args.ray:
        return contextlib.nullcontext({})
    _check_ray_model(args)

    runner = RayRunner(args.model or _default_model(), loader.rebuild_params(extractor), address=args.ray, num_workers=args.ray_workers, num_shards=args.shards)

    @contextlib.contextmanager
    def hooks():
        with runner:
            yield {"runner": runner}

    return hooks()


def _extraction_preset(args: argparse.Namespace) -> str:
    """``--extraction-preset``, else the EXTRACTION_PRESET of ``--config`` (if any), else ""."""
    if args.extraction_preset:
        return args.extraction_preset
    if getattr(args, "config", None):
        return _run_config(args).EXTRACTION_PRESET
    return ""


def _model_options(args: argparse.Namespace) -> dict:
    """Keras/TF model options given on the command line (only those set)."""
    options = {
        "layer": args.layer,
        "pooling": args.pooling,
        "gem_p": args.gem_p,
        "preprocess": args.preprocess,
        "resize": args.resize,
        "head": args.head,
        "batch_size": args.model_batch_size,
        "flip": True if args.flip else None,
    }
    if args.image_size is not None:
        if len(args.image_size) not in (1, 2):
            raise ValueError("--image-size takes one size S or two sizes H W")
        options["image_size"] = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    return {name: value for name, value in options.items() if value is not None}


def _is_keras_spec(spec: str | None) -> bool:
    if spec is None:
        return False
    path = Path(spec).expanduser()
    if path.is_file():
        return is_keras_file(path)
    try:
        return path.is_dir() and loader.detect_format(path) == "keras"
    except ValueError:
        return False


def _load_one(spec: str, args: argparse.Namespace, options: dict, *, for_global: bool, for_local: bool):
    """One model with the command line's overrides, loaded once: Keras options for Keras
    models, local parameters when it supplies local features, global scales when it
    supplies the global one (applied to the family's defaults or the extraction preset)."""
    keras = _is_keras_spec(spec)
    if keras and for_global and args.global_scales is not None:
        options = {**options, "scales": tuple(args.global_scales)}
    preset = "" if keras else _extraction_preset(args)  # extraction presets are DELG/DELF settings
    changes = {}
    if args.exif_transpose is not None:
        changes["exif_transpose"] = args.exif_transpose
    if args.max_image_size is not None:
        changes["max_image_size"] = args.max_image_size
    if for_local and args.max_features is not None:
        changes["max_feature_num"] = args.max_features
    if for_local and args.scales is not None:
        changes["image_scales"] = tuple(args.scales)
    if for_local and args.score_threshold is not None:
        changes["score_threshold"] = args.score_threshold
    if for_global and not keras and args.global_scales is not None:
        changes["global_scales"] = tuple(args.global_scales)
    params = extraction_params(preset) if preset else None
    if changes:
        params = dataclasses.replace(params or loader.default_params(spec), **changes)
    # Options given to a non-Keras model raise a clear error.
    return loader.load_extractor(spec, params, **options)


def build_extractor(args: argparse.Namespace):
    """The extractor named by ``--model`` (or ``--global-model`` + ``--local-model``) with
    the command line's parameter overrides and Keras/TF model options."""

    options = _model_options(args)
    if args.global_model or args.local_model:
        if not (args.global_model and args.local_model):
            raise ValueError("--global-model and --local-model go together")
        if args.model is not None:
            raise ValueError("give either --model or --global-model with --local-model")
        global_extractor = _load_one(args.global_model, args, options, for_global=True, for_local=False)
        local_extractor = _load_one(args.local_model, args, {}, for_global=False, for_local=True)
        return CompositeExtractor(global_extractor, local_extractor)
    return _load_one(args.model or _default_model(), args, options, for_global=True, for_local=True)


def _check_ray_model(args: argparse.Namespace) -> None:
    """Ray actors rebuild the model from --model and its parameters only."""
    if args.global_model or args.local_model or _model_options(args) or args.global_scales is not None:
        raise ValueError(
            "--ray supports --model with the extraction parameters only, not --global-model/"
            "--local-model or Keras model options; run without --ray"
        )


def _classifiers(args: argparse.Namespace, extractor) -> list:
    """Classifiers of --classes (the global model's head) and --classifier MODEL CSV."""

    found = []
    if args.classes:
        model = getattr(extractor, "global_extractor", extractor)
        found.append(Classifier(model, read_class_mapping(args.classes)))
    options = _model_options(args)
    for model, csv in args.classifier or ():
        found.append(load_classifier(model, csv, **options))
    return found


def _cmd_extract(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "the feature store")
    sources = list_images(args.images if len(args.images) > 1 else args.images[0], args.image_root)
    if not sources:
        print(f"no images found in {' '.join(args.images)}", file=sys.stderr)
        return 2
    extractor = build_extractor(args)
    store = FeatureStore(args.out, extractor.fingerprint(), dtype=args.dtype, wait=not args.no_wait)
    print(f"model: {extractor!r}\nstore: {store.path}")
    if args.ray:
        _check_ray_model(args)
        summary = distributed.extract_to_store_ray(
            args.model or _default_model(),
            extractor.params,
            sources,
            store,
            address=args.ray,
            num_workers=args.ray_workers,
            batch_size=args.batch_size,
            decode_threads=args.threads,
            retry_failed=args.retry_failed,
            progress=not args.no_progress,
        )
    else:
        summary = extract.extract_to_store(
            extractor,
            sources,
            store,
            batch_size=args.batch_size,
            decode_threads=args.threads,
            retry_failed=args.retry_failed,
            progress=not args.no_progress,
        )
    print(summary.report())
    return 0


def _check_run(
    args: argparse.Namespace, required: Sequence[str], output: str = "the submission", optional: Sequence[str] = ()
) -> None:
    """Everything a recognize/retrieve run can check before loading a model or extracting:
    the data folder and its CSVs (``required`` ones, and the ``optional`` ones the run
    reads when present), the --config/--set values, the submission file and the work dir."""

    check_match_device(_run_config(args))
    if not args.data_dir.is_dir():
        raise ValueError(f"data folder {args.data_dir} does not exist or is not a folder")
    missing = [name for name in required if not (args.data_dir / name).is_file()]
    if missing:
        raise ValueError(f"{args.data_dir} is not a Kaggle-layout dataset: missing {', '.join(missing)}")
    data = KaggleData(args.data_dir)
    for name in (*required, *optional):  # their content too, before a model is loaded
        if data.has(name):
            data.check(name)
    check_output_file(args.output, output)
    check_output_folder(args.work_dir or Path("delf_work"), "the feature cache (--work-dir)")


def _cmd_recognize(args: argparse.Namespace) -> int:
    _check_run(args, ("train.csv", "sample_submission.csv"), optional=("nonlandmark.csv",) if args.nonlandmark else ())
    extractor = build_extractor(args)
    config = _run_config(args)
    classifiers = _classifiers(args, extractor)
    if config.CLASSIFIER_MODE != "off" and not classifiers:
        raise ValueError(
            f"CLASSIFIER_MODE={config.CLASSIFIER_MODE!r} needs a classifier: --classes CSV (the model's "
            "softmax head) or --classifier MODEL CSV"
        )
    with _ray_hooks(args, extractor) as hooks:
        output = recognition.recognize(
            args.data_dir,
            extractor,
            config,
            classifiers=classifiers,
            output=args.output,
            work_dir=args.work_dir,
            use_nonlandmark=True if args.nonlandmark else None,
            verify=not args.no_verify,
            dtype=args.dtype,
            batch_size=args.batch_size,
            decode_threads=args.threads,
            progress=not args.no_progress,
            **hooks,
        )
    _report_scores(args, output.submission, "recognition")
    return EXIT_INVALID_SUBMISSION if output.problems else EXIT_OK


def _cmd_retrieve(args: argparse.Namespace) -> int:
    _check_run(args, ("index.csv", "sample_submission.csv"), optional=() if args.no_labels else ("train.csv",))
    extractor = build_extractor(args)
    with _ray_hooks(args, extractor) as hooks:
        output = retrieval.retrieve(
            args.data_dir,
            extractor,
            _run_config(args),
            output=args.output,
            work_dir=args.work_dir,
            use_labels=not args.no_labels,
            verify=not args.no_verify,
            dtype=args.dtype,
            batch_size=args.batch_size,
            decode_threads=args.threads,
            progress=not args.no_progress,
            **hooks,
        )
    _report_scores(args, output.submission, "retrieval")
    return EXIT_INVALID_SUBMISSION if output.problems else EXIT_OK


def _report_scores(args: argparse.Namespace, submission, kind: str) -> None:
    """Print the metric when the dataset ships its solution file."""

    name = "solution.csv" if kind == "recognition" else "retrieval_solution.csv"
    solution = Path(args.data_dir) / name
    if solution.is_file():
        scores = (evaluate_recognition if kind == "recognition" else evaluate_retrieval)(submission, solution)
        print(_format_scores(scores, "GAP" if kind == "recognition" else "mAP@100", str(solution)))


def _format_scores(scores: dict, metric: str, against: str) -> str:
    parts = ", ".join(f"{split} {value:.4f}" for split, value in scores.items())
    return f"{metric} against {against}: {parts}"


def _run_config(args: argparse.Namespace) -> Config:
    """The command's config, loaded once: ``--config`` (default: the preset suiting the
    model, whose family the registry tells from the spec without loading the model; a
    composite's local model decides) with the ``--set`` overrides applied."""
    if getattr(args, "run_config", None) is None:
        overrides = dict(parse_override(item) for item in args.set or ())
        base = args.config
        if not base:
            spec = getattr(args, "local_model", None) or getattr(args, "model", None) or _default_model()
            base = default_preset(loader.family_of(spec))
        args.run_config = load_config(base, **overrides)
    return args.run_config


def _cmd_evaluate(args: argparse.Namespace) -> int:


    _require_files(args.submission, args.solution)
    header = pd.read_csv(args.submission, nrows=0).columns.tolist()
    kind = args.kind or ("retrieval" if "images" in header else "recognition")
    scores = (evaluate_recognition if kind == "recognition" else evaluate_retrieval)(args.submission, args.solution)
    print(_format_scores(scores, "GAP" if kind == "recognition" else "mAP@100", str(args.solution)))
    if kind == "recognition":
        _report_calibration(args.submission, args.solution, args.plot)
    elif args.plot is not None:
        raise ValueError("--plot draws the reliability of recognition confidences; this is a retrieval submission")
    return 0


def _report_calibration(submission: Path, solution: Path, plot: Path | None, bins: int = 10) -> None:
    """Print ECE and Brier score of a recognition submission whose confidences are
    probabilities (else say they are scores); ``plot``: draw the reliability diagram."""
    calibration = evaluate_calibration(submission, solution, bins)
    if calibration is None:
        print("calibration: the confidences are scores, not probabilities (write them with --set CONFIDENCE=probability)")
        if plot is not None:
            raise ValueError("--plot needs confidences that are probabilities (CONFIDENCE=probability)")
        return
    print(
        f"calibration over {int(calibration['answers'])} answers ({calibration['accuracy']:.1%} right): "
        f"ECE {calibration['ECE']:.4f} ({bins} equal-width bins: sum of |bin| / N * |fraction right - mean "
        f"confidence|), Brier {calibration['Brier']:.4f} (mean of (confidence - right)^2)"
    )
    if plot is not None:
        check_output_file(plot, "the reliability diagram (--plot)")
        confidence, right, _ = answer_correctness(submission, solution)
        counts, accuracy, mean = reliability_bins(confidence, right, bins)
        title = f"{submission.name}: ECE {calibration['ECE']:.3f}, Brier {calibration['Brier']:.3f}"
        plot_reliability(counts, accuracy, mean, title=title, path=plot)
        print(f"reliability diagram: {plot}")


def _cmd_validate(args: argparse.Namespace) -> int:
    _require_files(args.submission, args.sample)
    problems = validate_submission(args.submission, args.sample, kind=args.kind)
    for problem in problems:
        print(f"problem: {problem}")
    print("valid" if not problems else f"{len(problems)} problem(s)")
    return EXIT_INVALID_SUBMISSION if problems else EXIT_OK


def _require_files(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))


def _cmd_clean(args: argparse.Namespace) -> int:
    _check_run(args, ("train.csv",), "the cleaned train.csv")
    extractor = build_extractor(args)
    with _ray_hooks(args, extractor) as hooks:
        if hooks:  # pair chunks on Ray too, once the extraction actors are stopped
            release = hooks["runner"].pool.close
            hooks = {**hooks, "run_chunks": RayChunkRunner(num_workers=args.ray_workers, release=release)}
        result = clean_dataset(
            args.data_dir,
            extractor,
            _run_config(args),
            output=args.output,
            report_path=args.report,
            pictures_dir="" if args.no_pictures else args.pictures,
            work_dir=args.work_dir,
            pairs=args.pairs,
            max_per_class=args.max_per_class,
            min_inliers=args.min_inliers,
            small_classes=args.small_classes,
            global_neighbours=args.global_neighbours,
            global_quantile=args.global_quantile,
            chunk_size=args.chunk_size,
            dtype=args.dtype,
            batch_size=args.batch_size,
            decode_threads=args.threads,
            progress=not args.no_progress,
            **hooks,
        )
    return 0 if len(result.report) else 2


def _cmd_demo(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "the demo output")
    run_demo(args.out, seed=args.seed, progress=not args.no_progress)
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    KaggleData(args.data_dir).require("train.csv")
    check_index_folder(args.data_dir, args.out)
    check_match_device(_run_config(args))
    extractor = build_extractor(args)
    config = _run_config(args) if args.config or args.set else None
    build_index(
        args.data_dir,
        extractor,
        args.out,
        config=config,
        use_nonlandmark=False if args.no_nonlandmark else None,
        thumbnail_size=args.thumbnail_size,
        dtype=args.dtype,
        search_dtype=args.search_dtype,
        batch_size=args.batch_size,
        decode_threads=args.threads,
        progress=not args.no_progress,
        classifiers=_classifiers(args, extractor),
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    return run_predict(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    changes = {"max_upload_bytes": int(args.max_upload_mb * 2**20)}
    if args.concurrency is not None:
        changes["concurrency"] = args.concurrency
    if args.threads_per_request is not None:
        changes["threads"] = args.threads_per_request
    serve(args.index_dir, host=args.host, port=args.port, settings=ServeSettings.for_cores(**changes))
    return 0


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="Kaggle-layout folder (train.csv, train/, test/, ...)")
    parser.add_argument("-o", "--output", type=Path, default=Path("submission.csv"), help="submission file")
    parser.add_argument(
        "--config",
        default=None,
        help="preset name (kaggle2020, kaggle2020-nonlandmark, opencv-sift, delf-matchfeatures, "
        "delg-r50-gldv2clean, delg-r101-gldv2clean, classifier, knn-classifier, aliked[-lightglue], "
        "disk[-lightglue], xfeat[-lighterglue]) or YAML/JSON file; default: the one suiting --model",
    )
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one config field, e.g. --set NUM_TO_RERANK=10")
    parser.add_argument("--work-dir", type=Path, default=None, help="feature cache (default ./delf_work)")
    parser.add_argument("--no-verify", action="store_true", help="global similarity only, no RANSAC")
    _add_model_arguments(parser)
    _add_ray_arguments(parser, shards=True)


def _add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", default=None, metavar="CSV", help="class_index,landmark_id of the (global) model's softmax head")
    parser.add_argument(
        "--classifier", nargs=2, action="append", metavar=("MODEL", "CSV"),
        help="another softmax classifier and its class mapping (repeatable; the most confident wins)",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delf-retrieval",
        description="Landmark recognition and retrieval with DELF/DELG features and RANSAC re-ranking.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    extract = commands.add_parser("extract", help="extract features of an image set into a store")
    extract.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="folder, Kaggle CSV (train.csv, index.csv, sample_submission.csv) or tar shard(s)",
    )
    extract.add_argument("--out", required=True, type=Path, help="feature store folder")
    extract.add_argument("--image-root", default=None, help="for a CSV: folder holding a/b/c/<id>.jpg")
    extract.add_argument("--retry-failed", action="store_true", help="retry images that failed before")
    extract.add_argument(
        "--no-wait",
        action="store_true",
        help="when another process is extracting into --out, stop with an error instead of waiting for it",
    )
    _add_model_arguments(extract)
    _add_ray_arguments(extract, shards=False)
    extract.set_defaults(func=_cmd_extract)

    recognize = commands.add_parser("recognize", help="recognition submission for a Kaggle-layout dataset")
    _add_run_arguments(recognize)
    _add_classifier_arguments(recognize)
    recognize.add_argument(
        "--nonlandmark",
        action="store_true",
        help="penalise queries and train images that look like nonlandmark.csv's photos (NONLANDMARK_PENALTY 1.0 unless set)",
    )
    recognize.set_defaults(func=_cmd_recognize)

    retrieve = commands.add_parser("retrieve", help="retrieval submission for a Kaggle-layout dataset")
    _add_run_arguments(retrieve)
    retrieve.add_argument("--no-labels", action="store_true", help="do not use train.csv labels to re-rank")
    retrieve.set_defaults(func=_cmd_retrieve)

    evaluate = commands.add_parser("evaluate", help="GAP or mAP@100 of a submission (Public, Private, All)")
    evaluate.add_argument("--submission", required=True, type=Path)
    evaluate.add_argument("--solution", required=True, type=Path)
    evaluate.add_argument("--kind", choices=("recognition", "retrieval"), default=None, help="default: from the header")
    evaluate.add_argument(
        "--plot", type=Path, default=None, metavar="FILE.png",
        help="draw the reliability diagram of the recognition confidences (probabilities) there",
    )
    evaluate.set_defaults(func=_cmd_evaluate)

    validate = commands.add_parser("validate", help="check a submission against sample_submission.csv")
    validate.add_argument("submission", type=Path)
    validate.add_argument("--sample", type=Path, required=True, help="sample_submission.csv")
    validate.add_argument("--kind", choices=("recognition", "retrieval"), default="recognition")
    validate.set_defaults(func=_cmd_validate)

    clean = commands.add_parser(
        "clean", help="drop train photos that verify against no other photo of their landmark"
    )
    clean.add_argument("data_dir", type=Path, help="Kaggle-layout folder with train.csv and train/")
    clean.add_argument("-o", "--output", type=Path, default=Path("train_clean.csv"), help="cleaned train.csv")
    clean.add_argument("--pairs", default="all", help="'all' (each photo against up to --max-per-class of its class) or 'knn:K' (its K nearest by global cosine)")
    clean.add_argument("--max-per-class", type=_positive_int, default=100, help="reference photos per class for --pairs all (default 100)")
    clean.add_argument("--min-inliers", type=int, default=11, help="inliers needed against some other photo of the class (default 11)")
    clean.add_argument(
        "--global-neighbours", type=_non_negative_int, default=2,
        help="keep a photo that fails verification when its K nearest photos by the model's own global "
        "descriptor are of its landmark, the nearest verified (default 2; 0: inliers alone; no effect "
        "for models without a global descriptor, e.g. opencv-sift)",
    )
    clean.add_argument(
        "--global-quantile", type=_unit_float, default=0.1,
        help="that nearest photo's cosine must reach this quantile of the verified pairs' cosines (default 0.1)",
    )
    clean.add_argument("--small-classes", choices=("keep", "drop"), default="keep", help="classes left with < 2 verified photos: keep them as they were or drop them")
    clean.add_argument("--report", type=Path, default=None, help="report CSV (default <output stem>_report.csv)")
    clean.add_argument("--pictures", type=Path, default=None, help="folder of per-class pictures of removed photos (default <output stem>_removed/)")
    clean.add_argument("--no-pictures", action="store_true", help="write no pictures")
    clean.add_argument("--chunk-size", type=_positive_int, default=1024, help="pairs per cached chunk (a killed run repeats at most one)")
    clean.add_argument("--config", default=None, help="preset name or YAML/JSON file (matching/RANSAC settings; MATCH_DTYPE=int8 for the fast product)")
    clean.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one config field, e.g. --set MATCH_DTYPE=int8")
    clean.add_argument("--work-dir", type=Path, default=None, help="feature and pair cache (default ./delf_work)")
    _add_model_arguments(clean)
    _add_ray_arguments(clean, shards=True)
    clean.set_defaults(func=_cmd_clean)

    demo = commands.add_parser("demo", help="build a small dataset from bundled photos and run recognition on it")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    index = commands.add_parser("index", help="build a recognition index folder from a Kaggle-layout dataset")
    index.add_argument("data_dir", type=Path, help="Kaggle-layout folder (train.csv + train/, optional labels.csv, nonlandmark.csv)")
    index.add_argument("--out", required=True, type=Path, help="index folder (rerun the same command to resume)")
    index.add_argument("--config", default=None, help="preset or YAML/JSON file stored in the index (default: the model's preset)")
    index.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one config field, e.g. --set LANDMARK_THRESHOLD=1.5")
    index.add_argument("--no-nonlandmark", action="store_true", help="leave nonlandmark.csv's distractor set out")
    _add_classifier_arguments(index)
    index.add_argument("--thumbnail-size", type=int, default=256, help="longer side of the thumbnails the web page shows (0: none)")
    index.add_argument(
        "--search-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of the searched train vectors: float32 (default, faster per photo, 2x the disk of float16) or float16 (the store's own)",
    )
    _add_model_arguments(index)
    index.set_defaults(func=_cmd_index)

    predict = commands.add_parser("predict", help="recognise the landmark in photos with an index")
    predict.add_argument("index_dir", type=Path, help="folder built by `delf-retrieval index`")
    predict.add_argument("photos", type=Path, nargs="+", help="photo file(s)")
    predict.add_argument("--json", action="store_true", help="print a JSON list of predictions")
    predict.add_argument("--show", type=Path, default=None, metavar="OUT.png", help="draw the query, its best neighbours and the inlier lines (several photos: OUT-<photo>.png)")
    predict.add_argument("--model", default=None, help="the index's model, if it moved")
    predict.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one config field, e.g. --set LANDMARK_THRESHOLD=2")
    predict.add_argument("--no-verify", action="store_true", help="global similarity only, no RANSAC")
    predict.set_defaults(func=_cmd_predict)

    serve = commands.add_parser("serve", help="web service and page for an index (needs the serve extra)")
    serve.add_argument("index_dir", type=Path, help="folder built by `delf-retrieval index`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--max-upload-mb", type=_positive_float, default=20.0, help="largest photo accepted, MiB (default 20)")
    serve.add_argument("--concurrency", type=_positive_int, default=None, help="predictions at once (default: one per core)")
    serve.add_argument("--threads-per-request", type=_positive_int, default=None, help="threads per prediction (default 1)")
    serve.set_defaults(func=_cmd_serve)
    return parser


def describe_error(error: BaseException) -> str:
    """One line for a user error: what went wrong and, where known, what to do."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({error.filename})" if error.filename else ""
        return (
            f"no space left on the device{where}: free some space or use another --work-dir/--out, "
            "then rerun the same command to resume"
        )
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.strerror}: {error.filename}"
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())  # one line


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as error:
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:
        if type(error).__module__.split(".")[0] == "ray":  # a worker or node of the cluster died
            print(f"error: Ray failed: {describe_error(error).split('. ')[0]}", file=sys.stderr)
            return EXIT_ERROR
        # A bug: keep the traceback, but not exit 1 (= invalid submission).
        traceback.print_exc()
        print(f"internal error in delf-retrieval {__version__}: please report the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
