"""The engines a stage scales out on: datatrove's executors (local processes, Slurm job arrays, a Ray cluster), one
way for every stage that runs as tasks (curate's passes, synth's slices). Finished tasks are marked by datatrove
(`LOGS/completions`) and skipped when the same pipeline runs again."""
from __future__ import annotations

from pathlib import Path

from datatrove.executor.local import LocalPipelineExecutor
from loguru import logger

from ezoforge.config import ExecutorConfig
from ezoforge.errors import ConfigError, EzoError


class _QuietLocal(LocalPipelineExecutor):
    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        logger.disable("datatrove")  # our own progress is the console output; errors still propagate
        return super()._run_for_rank(rank, local_rank, node_rank)


def executor(ex: ExecutorConfig, setting: str, pipeline: list, tasks: int, workers: int, logs: Path, name: str,
             depends=None):
    """The executor of `pipeline` over `tasks` tasks, `workers` at a time; `logs` holds datatrove's logs and
    completion markers (and Slurm's, beside them). `depends`: the executor that must finish first (same kind)."""
    if ex.kind == "local":
        logger.disable("datatrove")
        return _QuietLocal(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs))
    if ex.kind == "slurm":
        from datatrove.executor.slurm import SlurmPipelineExecutor

        sbatch = {**({"gres": f"gpu:{ex.gpus_per_task}"} if ex.gpus_per_task else {}), **ex.sbatch_args}
        return SlurmPipelineExecutor(
            pipeline, tasks=tasks, time=ex.time, partition=ex.partition, cpus_per_task=ex.cpus_per_task,
            mem_per_cpu_gb=ex.mem_per_cpu_gb, workers=workers, job_name=f"{ex.job_name}-{name}",
            venv_path=ex.venv_path, sbatch_args=sbatch, logging_dir=str(logs),
            slurm_logs_folder=str(logs.parent / f"slurm-{name}"), depends=depends)
    try:
        from datatrove.executor.ray import RayPipelineExecutor
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(f"{setting}=ray needs Ray: pip install 'ezoforge[dist]'") from None
    return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, depends=depends, logging_dir=str(logs),
                               cpus_per_task=ex.cpus_per_task, mem_per_cpu_gb=ex.mem_per_cpu_gb,
                               gpus_per_task=ex.gpus_per_task)


def check_shared_storage(out: Path, ex: ExecutorConfig, setting: str) -> None:
    """Slurm's and Ray's tasks on other nodes write into OUT: refuse a folder in this node's memory (tmpfs, ramfs).
    (A local disk looks like shared storage from here; a one-node Ray cluster may use one.)"""
    if ex.kind == "local":
        return
    mount = _mount_type(Path(out).resolve())
    if mount in ("tmpfs", "ramfs"):
        raise ConfigError(f"{setting}={ex.kind}: {out} is on {mount}, this node's memory; tasks on other nodes cannot "
                          "write there: give an --out on storage every node sees (NFS, Lustre, ...)")


def _mount_type(path: Path) -> str:
    """The filesystem type of the mount that holds `path` ('' where /proc/mounts cannot be read)."""
    best, kind = "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and (str(path) + "/").startswith(fields[1].rstrip("/") + "/") and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind


def launch(last, ex: ExecutorConfig, setting: str) -> None:
    """Run the chain ending in `last` (local, Ray: until done) or submit it (Slurm: returns at once)."""
    try:
        last.run()
    except FileNotFoundError as e:
        raise EzoError(f"{setting}={ex.kind}: {e.filename} not found (run on a Slurm login node)") from None


def completed_ranks(logs: Path) -> set[int]:
    """The tasks datatrove has marked complete in `logs`, by rank."""
    folder = logs / "completions"
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def completed(logs: Path) -> int:
    return len(completed_ranks(logs))


def pending_jobs(executors: list) -> list[str]:
    """The submitted Slurm jobs' ids (a placeholder when datatrove could not read them)."""
    return [str(e.job_id) for e in executors if getattr(e, "job_id", None) not in (None, -1)] or ["(ids unknown)"]
