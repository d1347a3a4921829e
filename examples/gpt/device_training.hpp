#pragma once
// --device cuda: train_gpt's loop on CUDA devices, at dp N x tp M x pp P as threads: each on a GPU
// of its own through NCCL where the process sees N x M x P GPUs, else all sharing GPU 0; or, with
// --backend mpi, as processes under mpirun, each on the GPU of its local rank on its node, every
// group's collectives through NCCL
// (ThreadDeviceComm). Each dp rank's DeviceGPTs train on its rows of the batch and their gradients
// are all-reduced on a communication stream while backward runs (DeviceDataParallel; after backward
// when both dp and tp go through NCCL, so that two NCCL communicators never run at once on a GPU);
// the tp ranks of a dp rank each hold their shard of every block (DeviceGPT's tensor parallelism);
// under pp each rank holds one stage of the CPU pipeline's cut (v model chunks under interleaving)
// and the step walks a GPipe, 1F1B, interleaved 1F1B or ZB-H1 schedule over --microbatches micro-batches
// (DevicePipeline; the dp reduction then after backward). The model
// trains on the device (gpt/device_model.hpp); a host HybridGPT of the same layout is the checkpoint format and
// the sampler: a save downloads the weights and AdamW's state into it and writes the same
// safetensors checkpoint as a CPU run (so either resumes the other, at any layout), a resume
// loads into it and uploads.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/checkpoint/checkpoint.hpp"
#include "tessera/checkpoint/gpt2.hpp"
#include "gpt/args.hpp"
#include "gpt/device_model.hpp"
#include "gpt/loss_curve.hpp"
#include "gpt/sampling.hpp"
#include "gpt/shared_dataset.hpp"
#include "tessera/checkpoint/hybrid_state.hpp"
#include "tessera/data/text_dataset.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/optim/warmup_cosine.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"

namespace train_gpt {

// This process's rank among those of the MPI job on its node: the launcher's variable (Open MPI's
// OMPI_COMM_WORLD_LOCAL_RANK, MPICH's MPI_LOCALRANKID, Slurm's SLURM_LOCALID), else the world
// rank (one node).
inline int local_rank(const Comm& world) {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* v = std::getenv(name); v != nullptr && *v != '\0') return std::atoi(v);
  return world.rank();
}

// Trains on CUDA device 0 as a rank of `world` (a.dp x a.tp x a.pp threads: world rank = (pp rank x
// dp + dp rank) x tp + tp rank) and returns the loss curve (every rank the same). The host model (the checkpoint
// format and the sampler) is the whole GPT on every rank.
inline std::vector<Point> train_on_device(Comm& world, const Args& a,
                                          checkpoint::CheckpointMeta (*meta)(const Args&, int), std::atomic<bool>& started) {
  using Clock = std::chrono::steady_clock;
  Mesh mesh(world, MeshShape{.dp = world.size(), .pp = 1, .tp = 1});
  const bool lead = world.rank() == 0;
  const auto dataset = shared_dataset(a.data, a.context);  // one copy for the thread ranks
  const data::TextDataset& ds = *dataset;
  HybridGPT<float> host(mesh, a.config(), a.seed, a.hybrid());
  DistributedOptimizer<optim::AdamW<float>> opt(host, a.adamw_groups(host.parameters()), ZeroStage::none);
  int start = 0;
  if (!a.resume.empty()) {
    const auto info = checkpoint::load_hybrid_checkpoint(a.resume, host, opt, checkpoint::gpt2_config_json(a.config()));
    start = static_cast<int>(info.step);
    if (lead)
      std::printf("resumed %s: step %d, saved at dp=%d pp=%d tp=%d, now on the device\n", a.resume.c_str(), start,
                  info.layout.dp, info.layout.pp, info.layout.tp);
  }
  const int tp = a.tp, pp = a.pp, dp = world.size() / (tp * pp);
  const int tp_rank = world.rank() % tp, dp_rank = world.rank() / tp % dp, pp_rank = world.rank() / (tp * dp);
  const int rows = a.batch / dp, r0 = dp_rank * rows;
  // ZeRO-1/2/3 over dp (1 / dp of AdamW's moments, under ZeRO-2 of the gradients, under ZeRO-3 of
  // the weights too, per rank).
  const int zero = dp == 1                                       ? 0
                   : a.zero_stage() == ZeroStage::optimizer  ? 1
                   : a.zero_stage() == ZeroStage::gradients  ? 2
                   : a.zero_stage() == ZeroStage::parameters ? 3
                                                             : 0;
  // A GPU per rank where there are enough and NCCL is built (the dp, tp and pp collectives through
  // NCCL); otherwise every rank on GPU 0 (threads sharing it, ThreadDeviceComm).
  const int ranks = dp * tp * pp;
  // Processes (--backend mpi) each drive the GPU of their local rank on their node, through NCCL.
  const bool processes = a.backend == "mpi";
  const bool own_gpus = processes || (ranks > 1 && built_with_nccl() && visible_gpus() >= ranks);
  // A process that sees one GPU drives it (a launcher that binds one GPU per task, e.g. Slurm's
  // --gpus-per-task=1 or CUDA_VISIBLE_DEVICES set per rank); one that sees several takes its local
  // rank's. (Two processes on one GPU are NCCL's "duplicate GPU" error at communicator creation.)
  const int local = processes ? (visible_gpus() == 1 ? 0 : local_rank(world)) : world.rank();
  {  // every rank learns whether one lacks its GPU
    const bool fits = !processes || local < visible_gpus();
    const double all = world.all_reduce_value(fits ? 1.0 : 0.0, ReduceOp::min);
    TESSERA_EXPECTS(all > 0, "train_gpt: --device cuda --backend mpi runs one process per GPU; ",
                    fits ? std::string("another rank's") : detail::str("rank ", world.rank(), "'s local rank ", local),
                    " is past its node's GPUs (this node sees ", visible_gpus(), "): start at most as many processes "
                    "per node as it has GPUs (nccl#418: two ranks on one GPU)");
  }
  // Each group's device collectives get a host communicator of their own (collective over the
  // world, every rank splitting alike).
  std::optional<Comm> tp_group, pp_group, emb_group;
  if (tp > 1) tp_group.emplace(world.split(pp_rank * dp + dp_rank, tp_rank));
  if (pp > 1) {
    pp_group.emplace(world.split(dp_rank * tp + tp_rank, pp_rank));
    // The tied wte's embedding group: the first and the last stage of each pipeline.
    const bool ends = pp_rank == 0 || pp_rank == pp - 1;
    Comm e = world.split(ends ? dp_rank * tp + tp_rank : dp * tp + world.rank(), pp_rank);
    if (ends) emb_group.emplace(std::move(e));
  }
  std::unique_ptr<DeviceModel> dev = make_device_model(a.config(), host.parameters(), a.seed, a.dtype == "bf16",
                                                       zero > 0 ? dp : 1, own_gpus ? local : 0, std::move(tp_group),
                                                       a.sequence_parallel && tp > 1, own_gpus, pp, pp_rank,
                                                       pp > 1 ? a.virtual_stages : 1);
  dev->set_fused_attention(a.attention == "flash");
  const int micro = pp > 1 ? a.num_microbatches() : 1;  // the pipeline's micro-batches per step
  if (pp > 1) dev->attach_pipeline(std::move(*pp_group), std::move(emb_group), a.schedule, micro, own_gpus);
  if (start > 0) dev->upload_optimizer(opt.replicated());
  // Buckets as DDP's default (25 MiB of fp32 gradients), reduced as backward finishes them;
  // ZeRO-1 shards AdamW's moments over dp, ZeRO-2 the gradients too, ZeRO-3 the weights too. The
  // device collectives' rendezvous get a host communicator of their own.
  // With tp through NCCL too, the dp reduction waits for the end of backward: NCCL kernels of two
  // communicators running at once on a GPU can deadlock (NCCL's user guide, "Using multiple NCCL
  // communicators concurrently"), as the tp collectives inside backward would with dp buckets.
  // Likewise the pipeline's transfers through NCCL. Threads sharing a GPU overlap under a pipeline
  // too: each chunk's last backward of the step reduces its buckets (DevicePipeline's
  // overlap_data_parallel; after the step under ZB-H1, whose weight gradients finish in W passes).
  if (dp > 1)
    dev->attach_data_parallel(world.split(pp_rank * tp + tp_rank, dp_rank), static_cast<std::int64_t>(a.bucket_bytes() / sizeof(float)), zero, own_gpus,
                              /*overlap=*/!(own_gpus && (tp > 1 || pp > 1)));
  std::int64_t n_params = 0;
  for (const Parameter<float>& p : host.parameters()) n_params += p.value.numel();
  if (lead)
    std::printf("GPT %d layers, d_model %d, %d heads, context %d; %s (%s), %s, dp %d x tp %d x pp %d%s%s%s%s; "
                "global batch %d x %d, accum %d; %lld parameters\n",
                a.layers, a.d_model, a.heads, a.context, own_gpus ? "a GPU per rank" : "one device",
                dev->device_name().c_str(),
                (std::string(a.dtype == "bf16" ? "bf16 mixed precision (fp32 master weights)" : "fp32 (TF32 off)") +
                 (a.attention == "flash" ? ", fused attention" : "")).c_str(),
                dp, tp, pp, a.sequence_parallel && tp > 1 ? " with sequence parallelism" : "",
                pp > 1 ? detail::str(" (", a.schedule, a.virtual_stages > 1 ? detail::str(", ", a.virtual_stages, " chunks per rank") : "",
                                     ", ", micro, " micro-batches)").c_str() : "",
                ranks == 1 ? "" : processes ? " (processes, one GPU each, NCCL)" : own_gpus ? " (threads, one GPU each, NCCL)" : " (threads sharing it)",
                zero == 3 ? ", ZeRO-3" : zero == 2 ? ", ZeRO-2" : zero == 1 ? ", ZeRO-1" : "", a.batch, a.context, a.accum, static_cast<long long>(n_params));
  const optim::WarmupCosine lr = a.lr_schedule();
  const optim::AdamWOptions adamw{.lr = a.lr, .weight_decay = a.weight_decay};
  const double tokens_per_step = static_cast<double>(a.batch) * a.context;
  const int chunk = rows / a.accum;
  std::ofstream json_log;
  if (!a.log_json.empty() && lead) json_log.open(a.log_json, std::ios::trunc);
  std::vector<Point> curve;
  std::int64_t skipped = 0, consecutive_skips = 0;  // --on-nonfinite skip: in all, and in a row
  started = true;
  const auto t_start = Clock::now();
  double tokens = 0, elapsed = 0;
  for (int step = start; step < a.steps; ++step) {
    const auto t0 = Clock::now();
    const data::Batch b = ds.batch(data::Split::train, a.seed, step, a.batch, r0, r0 + rows);
    dev->zero_grad();
    if (pp > 1) {  // one pipelined step over the micro-batches (accum is 1: checked before training)
      const int mrows = rows / micro;
      std::vector<Tensor<std::int32_t>> xs, ys;
      std::vector<BatchPosition> at;
      for (int k = 0; k < micro; ++k) {
        xs.push_back(b.inputs.slice(0, k * mrows, (k + 1) * mrows).contiguous());
        ys.push_back(b.targets.slice(0, k * mrows, (k + 1) * mrows).contiguous());
        at.push_back(BatchPosition{.step = static_cast<std::uint64_t>(step), .first_row = r0 + k * mrows});
      }
      dev->forward_backward_pipeline(xs, ys, static_cast<float>(1.0 / tokens_per_step), at);
    }
    for (int k = 0; k < (pp > 1 ? 0 : a.accum); ++k) {
      const Tensor<std::int32_t> x = b.inputs.slice(0, k * chunk, (k + 1) * chunk).contiguous();
      const Tensor<std::int32_t> y = b.targets.slice(0, k * chunk, (k + 1) * chunk).contiguous();
      // The rows' place in the global batch: dropout draws the masks of the CPU run. The last
      // micro-batch's backward reduces the gradients over dp (the others only accumulate).
      dev->set_sync(k == a.accum - 1);
      dev->forward_backward(x, y, static_cast<float>(1.0 / tokens_per_step),
                            BatchPosition{.step = static_cast<std::uint64_t>(step), .first_row = r0 + k * chunk});
    }
    dev->finish_gradients();
    // Every tp rank holds its dp rank's loss: summed over the world, each counted once.
    const double loss = world.all_reduce_value(dev->take_loss_sum(), ReduceOp::sum) / tp / tokens_per_step;
    const double norm = dev->grad_norm();  // of the summed gradients: the same on every rank (collective over tp)
    const bool finite = std::isfinite(loss) && std::isfinite(norm);
    if (finite) {
      consecutive_skips = 0;
      const float scale = a.clip > 0 && norm > a.clip ? static_cast<float>(a.clip / (norm + 1e-6)) : 1.f;
      dev->step(adamw, lr(step), scale);
    } else {
      if (a.on_nonfinite != "skip") {
        const std::string bad = dev->nonfinite_gradient();
        throw Error(detail::str("train_gpt: step ", step, ": the loss (", loss, ") or the gradient norm (", norm,
                                ") is not finite on the device; ",
                                bad.empty() ? std::string("every gradient of world rank ") + std::to_string(world.rank()) +
                                                  " is finite"
                                            : "the first non-finite gradient of world rank " +
                                                  std::to_string(world.rank()) + ": " + bad,
                                "; --on-nonfinite skip skips such steps"));
      }
      TESSERA_EXPECTS(a.max_consecutive_skips == 0 || consecutive_skips < a.max_consecutive_skips, "train_gpt: step ", step,
                      ": the loss (", loss, ") or the gradient norm (", norm, ") is not finite on the device, and the ",
                      consecutive_skips, " step(s) before it were skipped too, the most in a row allowed "
                      "(--max-consecutive-skips ", a.max_consecutive_skips, "): training has diverged");
      ++skipped;
      ++consecutive_skips;
      if (lead)
        std::printf("step %4d  skipped (%lld so far): loss %g, gradient norm %g\n", step,
                    static_cast<long long>(skipped), loss, norm);
    }
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    tokens += tokens_per_step;
    elapsed += dt;
    Point pt{step, loss, -1.0};
    const bool last = step == a.steps - 1;
    if (a.val_every > 0 && (step % a.val_every == 0 || last)) {
      for (int i = 0; i < a.val_batches; ++i) {
        const data::Batch v = ds.batch(data::Split::val, a.seed, i, a.batch, r0, r0 + rows);
        // Under a pipeline in micro-batches of the training's shape (the stages' activations).
        const int mrows = rows / micro;
        for (int k = 0; k < micro; ++k)
          dev->evaluate(v.inputs.slice(0, k * mrows, (k + 1) * mrows).contiguous(),
                        v.targets.slice(0, k * mrows, (k + 1) * mrows).contiguous());
      }
      pt.val = world.all_reduce_value(dev->take_loss_sum(), ReduceOp::sum) / tp / (tokens_per_step * a.val_batches);
    }
    if (finite) curve.push_back(pt);
    if (json_log.is_open()) {
      nlohmann::json j = {{"step", step}, {"loss", loss}, {"lr", lr(step)}, {"tokens_per_s", tokens_per_step / dt},
                          {"grad_norm", norm}, {"skipped", !finite}, {"skipped_steps", skipped}, {"step_seconds", dt},
                          {"device", "cuda"}, {"dtype", a.dtype}};
      if (pt.has_val()) j["val_loss"] = pt.val;  // NaN: null
      json_log << j.dump() << std::endl;
    }
    if (!a.quiet && (step % a.log_every == 0 || last)) {
      if (lead)
        std::printf("step %4d  loss %.4f  lr %.2e  %8.0f tokens/s  device cuda %s\n", step, loss, lr(step),
                    tokens / elapsed, a.dtype.c_str());
      tokens = elapsed = 0;
    }
    if (pt.has_val() && lead) std::printf("step %4d  validation loss %.4f\n", step, pt.val);
    if (!a.save.empty() && ((a.save_every > 0 && (step + 1) % a.save_every == 0) || last)) {
      dev->download(host.parameters());
      dev->download_optimizer(opt.replicated());
      checkpoint::save_hybrid_checkpoint(a.save, host, opt, meta(a, step + 1));
      if (!a.quiet && lead) std::printf("step %4d  saved %s\n", step, a.save.c_str());
    }
  }
  if (a.steps > start && lead)
    std::printf("trained steps %d..%d in %.1f s on the device (activations %.3g MB, device memory peak %.3g MB)\n",
                start, a.steps - 1, std::chrono::duration<double>(Clock::now() - t_start).count(),
                static_cast<double>(dev->activation_bytes()) / 1e6, static_cast<double>(dev->peak_device_bytes()) / 1e6);
  if (a.sample_len > 0) {
    dev->download(host.parameters());
    const std::string text = sample(host, a);
    if (lead) {
      std::printf("--- sample ---\n");
      print_sample(text);
      std::printf("\n--------------\n");
    }
  }
  return curve;
}

}  // namespace train_gpt
