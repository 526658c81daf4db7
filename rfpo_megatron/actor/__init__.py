"""Megatron-core actor: parallel init, model from an HF config, CPU/gloo compat, packing, log-prob pass, train step, checkpoints.

Modules (import them directly; importing this package does not import megatron):
  compat      enable_cpu_compat(): CUDA->CPU redirect + CPU RNG tracker (no-op on GPU machines)
  parallel    init_parallel(tp, pp, seed, backend, timeout_s), destroy_parallel(), parallel_info()
  model       transformer_config_from_hf(), padded_vocab_size(), build_model()
  batch       ActorBatch (per-sample ids + per-response-token tensors)
  packing     make_microbatches() by token budget, split_for_dp(), pack_microbatch() (pad / thd)
  forward     run_schedule() through get_forward_backward_func, logprob_output_fn()
  actor       Actor: compute_logprobs(), train_step(), forward_logits()
  critic      Critic (an Actor with a value head): compute_values(), train_step() (clipped value loss)
  checkpoint  save_actor_state(), load_actor_state(); step_dir_name(), latest_step_dir(), write_latest(), prune_step_dirs()
  launch      spawn_world(): run a function on N local gloo ranks
"""
