"""The `densiformer` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


# The default Hipparcos model: photometry, parallax and proper motions in, absolute
# magnitude and colour out. Proper motions carry distance information (reduced
# proper motion), which separates giants from dwarfs when the parallax is absent.
HIPPARCOS_COLUMNS = ["hpmag", "b_v", "v_i", "plx", "e_plx", "pmra", "pmdec"]
HIPPARCOS_TARGETS = ["abs_hpmag", "b_v", "v_i"]


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of column names")
    return names


def _load_training_data(source: str):
    """(data, default columns): the bundled Hipparcos training split, or a file path."""
    from .datasets import hipparcos

    if source == "hipparcos":
        return hipparcos("train"), HIPPARCOS_COLUMNS
    from .data.readers import file_columns

    if not Path(source).exists():
        raise SystemExit(f"densiformer train: --data {source!r}: no such file (or use 'hipparcos')")
    return source, file_columns(source)


def argv_used(args) -> list[str]:
    """The train command's arguments, as a reproducible command line."""
    return [f"--data {args.data}", f"--targets {','.join(args.targets)}",
            *( [f"--columns {','.join(args.columns)}"] if args.columns else []),
            f"--epochs {args.epochs}", f"--batch-size {args.batch_size}", f"--lr {args.lr}", f"--seed {args.seed}",
            f"--d-model {args.d_model}", f"--encoder-layers {args.encoder_layers}", f"--heads {args.heads}",
            f"--head-width {args.head_width}", f"--head-layers {args.head_layers}", f"--out {args.out}"]


def cmd_train(args) -> int:
    from . import DensityEstimator, ModelConfig

    data, default_columns = _load_training_data(args.data)
    columns = args.columns or [c for c in default_columns if c not in ("hip", "ra", "dec")]
    config = ModelConfig(d_model=args.d_model, encoder_layers=args.encoder_layers, heads=args.heads,
                         head_width=args.head_width, head_layers=args.head_layers)
    est = DensityEstimator(columns=columns, targets=args.targets, config=config)
    est.fit(data, epochs=args.epochs, batch_size=args.batch_size, device=args.device, seed=args.seed,
            lr=args.lr, checkpoint=args.out)
    est.training["command"] = "densiformer train " + " ".join(argv_used(args))
    est.save(args.out)
    h = est.history
    print(f"trained in {h.seconds:.1f} s; validation loss by epoch: "
          + ", ".join(f"{v:.4f}" for v in h.val_loss))
    print(f"model written to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from . import DensityEstimator, ModelConfig, demo
    from .assets import default_model
    from .datasets import hipparcos

    out = Path(args.out)
    if args.train:
        model_dir = out / "model"
        print(f"training a small model on the Hipparcos training split ({args.epochs} epochs) ...")
        est = DensityEstimator(HIPPARCOS_COLUMNS, HIPPARCOS_TARGETS, ModelConfig())
        est.fit(hipparcos("train"), epochs=args.epochs, batch_size=512, seed=0, checkpoint=model_dir)
        est.save(model_dir)
        print(f"trained in {est.history.seconds:.0f} s, validation loss "
              f"{est.history.val_loss[0]:.3f} -> {est.history.val_loss[-1]:.3f}; model in {model_dir}")
    else:
        est = default_model()
        print(f"using the bundled Hipparcos model (trained by: {est.training['command']})")
    done = demo.run(est, out, num_samples=args.num_samples)
    star, paths = done["star"], done["paths"]
    print(f"\n{done['rows']:,} stars inferred in {done['infer_seconds']:.0f} s; the true M_Hp falls in the "
          f"central 68% interval for {100 * done['coverage68']:.1f}% of them")
    print(f"red star HIP {int(star.hip)} (B-V {star.b_v:.2f}, catalogue M_Hp {star.abs_hpmag:.2f}): "
          + "; ".join(f"P(giant) {p:.2f} {label}" for label, p in done["fractions"].items()))
    print("\nwritten:")
    for what, label in (("catalog", "input catalogue (parallax withheld)"),
                        ("posteriors", "posterior summaries and samples (Parquet dataset)"),
                        ("hr_diagram", "HR diagram, catalogue vs posterior medians"),
                        ("red_star", "M_Hp posterior of a red star: giant or dwarf"),
                        ("calibration", "calibration (PIT and coverage) on the test split")):
        print(f"  {paths[what]}  {label}")
    print(f"done in {done['seconds']:.0f} s")
    return 0


def _column_map(text: str) -> dict[str, str]:
    mapping = {}
    for item in _names(text):
        model_name, sep, file_name = item.partition("=")
        if not sep or not model_name.strip() or not file_name.strip():
            raise argparse.ArgumentTypeError(f"--columns takes model_name=catalog_name pairs, got {item!r}")
        mapping[model_name.strip()] = file_name.strip()
    return mapping


def cmd_infer(args) -> int:
    options = dict(request=args.request, num_samples=args.num_samples, seed=args.seed, id_column=args.id_column,
                   columns=args.columns, sampler=args.sampler, steps=args.steps, backend=args.backend,
                   samples=args.samples, log_prob_of=args.log_prob_of)
    if args.ray:
        from .inference.ray import infer_ray

        result = infer_ray(args.catalog, args.model, args.out, address=args.ray_address,
                           rows_per_batch=args.batch_size, device=args.device, **options)
    else:
        from .inference import infer

        result = infer(args.catalog, args.model, args.out, rows_per_part=args.batch_size, resume=args.resume,
                       device=args.device, **options)
    print(f"{result.rows} rows in {result.out} ({result.computed} computed in {result.seconds:.1f} s, "
          f"{result.rows_per_second:.0f} rows/s)")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args.out, args.rows, args.num_samples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densiformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="posterior summaries for Hipparcos stars with the bundled model")
    demo.add_argument("--out", default="densiformer_demo", help="output directory (default: %(default)s)")
    demo.add_argument("--num-samples", type=int, default=200, help="samples per star (default: %(default)s)")
    demo.add_argument("--train", action="store_true",
                      help="train a fresh small model on the Hipparcos training split instead")
    demo.add_argument("--epochs", type=int, default=8, help="epochs for --train (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train a model and save it to a directory")
    tr.add_argument("--data", required=True, help="'hipparcos' (bundled) or a Parquet/CSV/FITS/HDF5 file")
    tr.add_argument("--targets", required=True, type=_names, help="comma-separated target columns")
    tr.add_argument("--columns", type=_names, help="comma-separated input columns (default: all in the data)")
    tr.add_argument("--out", required=True, help="model directory to write")
    tr.add_argument("--epochs", type=int, default=20)
    tr.add_argument("--batch-size", type=int, default=512)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--d-model", type=int, default=64)
    tr.add_argument("--encoder-layers", type=int, default=2)
    tr.add_argument("--heads", type=int, default=4)
    tr.add_argument("--head-width", type=int, default=256)
    tr.add_argument("--head-layers", type=int, default=3)
    tr.set_defaults(func=cmd_train)

    inf = sub.add_parser("infer", help="posterior summaries for every row of a catalog, streamed to Parquet")
    inf.add_argument("catalog", help="Parquet file or directory of parts, CSV, FITS or HDF5")
    inf.add_argument("--model", required=True, help="model directory (see `densiformer train`)")
    inf.add_argument("--request", type=_names, help="comma-separated targets to summarise (default: all)")
    inf.add_argument("--num-samples", type=int, default=100, help="samples per row (default: %(default)s)")
    inf.add_argument("--out", required=True, help="output Parquet dataset (a directory)")
    inf.add_argument("--id-column", help="catalog column to copy as the row id (default: the row index, `row`)")
    inf.add_argument("--columns", type=_column_map, default={},
                     help="model_name=catalog_name,... for columns named differently in the catalog")
    inf.add_argument("--samples", action="store_true", help="also write the samples (fixed-size list columns)")
    inf.add_argument("--log-prob-of", type=_names, default=[],
                     help="targets whose observed values' joint log density to write as `log_prob`")
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument("--sampler", choices=["ddpm", "ddim", "heun", "dpmpp2m"], help="default: the measured best")
    inf.add_argument("--steps", type=int, help="sampler steps (default: the sampler's)")
    inf.add_argument("--backend", default="auto", help="head-loop kernel: auto, cpu, triton, cuda or torch")
    inf.add_argument("--device", default="auto")
    inf.add_argument("--batch-size", type=int,
                     help="rows per part file (with --ray: per batch); default: from free memory")
    inf.add_argument("--resume", action="store_true", help="finish the job already in --out")
    inf.add_argument("--ray", action="store_true", help="run on a Ray cluster with Ray Data (Parquet input)")
    inf.add_argument("--ray-address", help="address of an existing Ray cluster (default: RAY_ADDRESS, "
                     "else start a local one)")
    inf.set_defaults(func=cmd_infer)

    be = sub.add_parser("bench", help="sampling speed of the bundled model on each backend here")
    be.add_argument("--out", help="also write the results to this JSON file")
    be.add_argument("--rows", type=int, default=256)
    be.add_argument("--num-samples", type=int, default=100)
    be.set_defaults(func=cmd_bench)
    from .guidance.cli import add_events_parser

    add_events_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"densiformer {args.command}: error: {err}", file=sys.stderr)
        return 2
