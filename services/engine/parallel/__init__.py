"""Tensor parallelism (`--tp N`): one process per rank, rank 0 schedules and broadcasts each step.

- `group.py`: the process group of one engine's ranks (gloo on CPU, NCCL on CUDA, a TCP store on
  a free port), with deadlines on every collective;
- `layers.py`: the parallel layers (column / row-parallel attention and MLP, vocab-parallel
  embedding and LM head) as subclasses of the Llama modules, and each tensor's shard rule;
- `step.py`: one step's inputs on the wire (rank 0 packs, the other ranks unpack) and the forward
  every rank runs on them;
- `runner.py`: rank 0's model runner (broadcast, then run) and the other ranks' follow loop;
- `graphs.py`: decode CUDA graphs that every rank captures alike and replays on rank 0's staged inputs;
- `setup.py`: what every rank builds identically (sharded model, KV cache of its heads);
- `launch.py`: rank 0 starting its child ranks and watching them; `rank_main.py`: a child's main.

docs/parallel.md tells the whole story.
"""
