"""Two plug-in stages for the sharding tests, installed as a package with entry points (as a user's are):
`salt` writes a salt; `blocks`, sharded, writes block-<s>.bin from the salt and s (so a block's bytes do
not depend on which process made it) and, with shard=None, blocks.json over all of them. Pure Python:
a job starts in a second, without torch."""
import os
import textwrap

from tests.conftest import ROOT

N_BLOCKS = 6

SOURCE = textwrap.dedent('''
    """salt -> blocks (sharded): the sharding tests' stages."""
    import hashlib
    import json
    import os
    import time
    from dataclasses import dataclass

    from pipeline.stage import Stage

    N_BLOCKS = {n_blocks}


    @dataclass
    class SaltConfig:
        text: str = "pepper"  # what salt.txt holds


    @dataclass
    class BlocksConfig:
        size: int = 4096  # bytes per block
        fail_block: int = -1  # a process asked to make this block raises (insignificant: a rerun resumes)
        seconds_per_block: float = 0.0  # a pause before each block, so a test can catch a job running


    def write(path, data):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


    def run_salt(ctx):
        if ctx.dist.is_main:  # under torchrun the other ranks would race it for the temp name
            write(ctx.out_dir / "salt.txt", ctx.config.salt.text.encode())


    def run_blocks(ctx):
        cfg = ctx.config.blocks
        salt = (ctx.inputs["salt"].path / "salt.txt").read_bytes()
        index, count = ctx.shard or (0, 1)
        for s in range(N_BLOCKS):
            path = ctx.out_dir / f"block-{s}.bin"
            if s % count != index or path.exists():
                continue
            time.sleep(cfg.seconds_per_block)
            if s == cfg.fail_block:
                raise RuntimeError(f"asked to fail at block {s}")
            write(path, b"".join(hashlib.sha256(salt + f"{s}:{i}".encode()).digest() for i in range(cfg.size // 32)))
            print(f"made block {s} in pid {os.getpid()}", flush=True)
        if ctx.shard is None:
            digests = {f"block-{s}.bin": hashlib.sha256((ctx.out_dir / f"block-{s}.bin").read_bytes()).hexdigest()
                       for s in range(N_BLOCKS)}
            write(ctx.out_dir / "blocks.json", json.dumps(digests, sort_keys=True).encode())


    SALT = Stage(name="salt", version=1, section="salt", config=SaltConfig, run=run_salt, outputs=("salt.txt",))
    BLOCKS = Stage(name="blocks", version=1, section="blocks", config=BlocksConfig, run=run_blocks,
                   inputs=lambda config: ("salt",), insignificant=("fail_block", "seconds_per_block"),
                   outputs=tuple(f"block-{s}.bin" for s in range(N_BLOCKS)) + ("blocks.json",),
                   shards=lambda config: N_BLOCKS)
''').replace("{n_blocks}", str(N_BLOCKS))


def install(site) -> dict:
    """Install the package under `site`; the environment a CLI run needs to find it (and this code)."""
    (site / "sharded_stages").mkdir(parents=True)
    (site / "sharded_stages" / "__init__.py").write_text(SOURCE)
    info = site / "sharded_stages-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sharded-stages\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rst_mart.stages]\nsalt = sharded_stages:SALT\n"
                                           "blocks = sharded_stages:BLOCKS\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
