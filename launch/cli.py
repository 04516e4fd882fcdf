"""geno-launch: validate a recipe's layout for N nodes x G GPUs, print the plan, start it.

The recipe (launch/recipes/*.yaml or a path) is a geno-train config plus a `launch` section.
Before anything starts, the layout is checked against the world size and the model; the derived
numbers are printed; the resolved config is written to RUN_DIR/launch/<recipe>.yaml; then
torchrun (one node) or sbatch (SLURM; always for more than one node) runs it with the Python that
runs geno-launch (--python to name another). --dry-run writes the config and prints the command
exactly as the real run would execute it, then stops.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from megatron_geno.lifetime import die_with_parent_if_spawned

die_with_parent_if_spawned()  # in a multiprocessing spawn child (which imports the main module)

HERE = Path(__file__).resolve().parent

EPILOG = """\
examples:
  geno-launch --recipe genos-1.2b-8k --nodes 16 --gpus-per-node 8 --dry-run
  geno-launch --recipe genos-10b-32k --nodes 32 --gpus-per-node 8 --time 48:00:00 \\
      --account bio --container nvcr.io/me/megatron-geno:latest "data.blend=[1, /lustre/corpora/human]"
  geno-launch --recipe my-recipe.yaml --nodes 1 --gpus-per-node 8 --torchrun
  geno-launch --list

Phases run in order; each later recipe names the previous one's checkpoint in checkpoint.load
with checkpoint.weights_only (fresh optimizer and schedule). A restarted or requeued phase resumes
from its own latest checkpoint (checkpoint.auto_resume).
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="geno-launch", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true",
                        help="show the known third-party warnings hidden by default")
    parser.add_argument("--recipe", help="recipe name (see --list) or YAML path")
    parser.add_argument("--list", action="store_true", help="list the bundled recipes")
    parser.add_argument("--nodes", type=int, default=1,
                        help="nodes (default 1; more than one submits a SLURM job)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--torchrun", action="store_true", help="run on this node (default)")
    mode.add_argument("--slurm", action="store_true", help="submit launch/slurm/geno.sbatch")
    parser.add_argument("--dry-run", action="store_true", help="validate, print, do not start")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="GPU memory the plan is checked against, in GiB (default 80: H100 / "
                        "A100 80GB; 141: H200); the plan names the largest micro batch that fits")
    parser.add_argument("--time", help="SLURM time limit (sbatch --time)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--container", metavar="IMAGE",
                        help="run the SLURM job in this image: pyxis/enroot (srun "
                        "--container-image) or, for a .sif file, Apptainer; the project's docker/ "
                        "image, which has Transformer Engine")
    parser.add_argument("--python", metavar="PATH",
                        help="the interpreter that runs geno-train (default: the one running "
                        "geno-launch; python3 inside a --container)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="geno-train config overrides, applied after the recipe")
    return parser.parse_intermixed_args(argv)


def interpreter(args) -> str:
    """The Python that runs geno-train: --python, else python3 in a container, else this one."""
    return args.python or ("python3" if args.container else sys.executable)


def commands(args, config: Path, recipe: str) -> list[str]:
    """Returns the command that starts the run (torchrun script or sbatch), exactly as run."""
    python = interpreter(args)
    if args.slurm:
        export = f"--export=ALL,PYTHON={python}" + (f",GENO_CONTAINER={args.container}"
                                                     if args.container else "")
        cmd = ["sbatch", f"--nodes={args.nodes}", f"--gpus-per-node={args.gpus_per_node}",
               f"--job-name={recipe}", f"--output={config.parent}/slurm-%j.out", export]
        for flag in ("time", "partition", "account"):
            if getattr(args, flag):
                cmd.append(f"--{flag}={getattr(args, flag)}")
        return cmd + [str(HERE / "slurm" / "geno.sbatch"), str(config)]
    return ["env", f"GPUS_PER_NODE={args.gpus_per_node}", f"PYTHON={python}", "bash",
            str(HERE / "torchrun.sh"), str(config)]


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_geno.quiet import quiet_known_warnings

    quiet_known_warnings(args.verbose)
    from launch.plan import GPU_MEMORY_GIB, LayoutError, format_plan, plan
    from launch.recipe import RECIPE_DIR, load_recipe
    from megatron_geno.config import ConfigError

    if args.list:
        for path in sorted(RECIPE_DIR.glob("*.yaml")):
            print(path.stem)
        return 0
    try:
        if not args.recipe:
            raise ConfigError("--recipe is required (see --list)")
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError("--nodes and --gpus-per-node must be >= 1")
        gpu_gib = GPU_MEMORY_GIB if args.gpu_memory is None else args.gpu_memory
        if not (math.isfinite(gpu_gib) and gpu_gib > 0):
            raise ConfigError(f"--gpu-memory must be > 0 GiB, got {gpu_gib:g}")
        if args.nodes > 1 and args.torchrun:
            raise ConfigError(f"--nodes {args.nodes} needs SLURM (torchrun.sh runs one node); "
                              f"drop --torchrun")
        args.slurm = args.slurm or args.nodes > 1  # several nodes: always a SLURM job
        if args.container and not args.slurm:
            raise ConfigError("--container is for SLURM jobs (--slurm); on this node, run "
                              "geno-launch inside the image")
        cfg, launch, path = load_recipe(args.recipe, args.overrides)
        world = args.nodes * args.gpus_per_node
        result = plan(cfg, world, launch.token_budget, gpu_gib)
        # the stack the job will run, resolved for its GPU nodes (the docker image: CUDA, TE),
        # not for the login node geno-launch runs on
        from megatron_geno.runtime import Machine, resolve

        runtime = resolve(cfg, Machine.gpu_node(), world)
    except (ConfigError, LayoutError) as err:
        print(f"geno-launch: error: {err}", file=sys.stderr)
        return 2
    print(f"recipe     {launch.name} (phase {launch.phase}"
          + (f", starts from {launch.previous}: weights only" if launch.previous else "") + ")")
    print(f"stack      {runtime.line()} (GPU nodes with the docker image's Transformer "
          f"Engine)")
    print(format_plan(cfg, result, launch.token_budget))
    config = Path(cfg.logging.run_dir) / "launch" / f"{launch.name}.yaml"
    resolved = cfg.to_yaml()
    if args.dry_run and config.exists() and config.read_text() != resolved:
        # the config an earlier launch of this run directory ran with stays as it was
        config = config.with_name(f"{launch.name}.dry-run.yaml")
    cmd = commands(args, config, launch.name)
    if not args.dry_run and shutil.which(cmd[0]) is None:
        print(f"geno-launch: error: {cmd[0]} is not on PATH"
              + (": submit from a SLURM login node, or print the job with --dry-run"
                 if cmd[0] == "sbatch" else ""), file=sys.stderr)
        return 2
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(resolved)  # a dry run writes it too: the printed command runs as is
    print(f"config     {config}")
    print(f"command    {shlex.join(cmd)}")
    if args.dry_run:
        return 0
    return subprocess.call(cmd, env=dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
