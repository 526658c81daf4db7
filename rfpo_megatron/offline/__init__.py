"""Offline checkpoint tools, above the actor and the conversion library: `rfpo-megatron convert hf2mcore|mcore2hf`.

Modules (imported lazily so that `import rfpo_megatron.offline` stays light):

- tools.py        `hf_to_mcore`, `mcore_to_hf` (HF <-> the actor's checkpoint or sharded rfpo-mcore), checked
                  against the megatron architecture the actor builds (`check_against_actor`)
- actor_format.py the actor's "full" checkpoint format read/written offline; dist_format.py its "dist" one
                  (megatron dist_checkpointing, read by building the actor's model in this process)
- cli.py          the `rfpo-megatron convert` command line

The name/shape mapping itself (arch, mapping, sharding, export, hf_io, hf_load, mcore_io, validate) is
rfpo_megatron.convert, which the actor uses; this package uses both.
"""
