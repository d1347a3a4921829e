// 05: train_gpt, the main job. Trains a GPT-2-architecture model on a text file (byte-level
// tokens) across dp x pp x tp ranks, saves and resumes sharded checkpoints at any layout,
// samples from it, and evaluates a Hugging Face GPT-2 safetensors file.
//
//   OPENBLAS_NUM_THREADS=1 ./build/examples/train_gpt --data data/kjv.txt --dp 2 --pp 2 --tp 2 --steps 300
//   OPENBLAS_NUM_THREADS=1 ./build/examples/train_gpt --resume ckpt --generate --tp 2 --prompt "And God said"
//   mpirun -np 4 ./build/examples/train_gpt --backend mpi --dp 2 --tp 2
//   OPENBLAS_NUM_THREADS=1 ./build/examples/train_gpt --eval-model gpt2/model.safetensors --eval-tokens ids.txt --tp 2
//
// The training loop (train_rank) reads top to bottom like llm.c's: make the mesh and the model
// over it and the optimizer over the model's parameters, then for each step take the batch,
// forward and backward every accumulation step, clip, step the optimizer, log, validate, save. Options, sampling, evaluation, the loss curve
// and the serial check are modules beside it (examples/gpt/). Only world rank 0 prints.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "gpt/args.hpp"
#include "gpt/auto_plan.hpp"
#include "gpt/dp_communication.hpp"
#include "gpt/device_training.hpp"
#include "gpt/evaluation.hpp"
#include "gpt/loss_curve.hpp"
#include "gpt/memory_report.hpp"
#include "gpt/sampling.hpp"
#include "gpt/shared_dataset.hpp"
#include "gpt/serial_reference.hpp"
#include "tessera/checkpoint/checkpoint.hpp"
#include "tessera/checkpoint/hybrid_state.hpp"
#include "tessera/comm/launch.hpp"
#include "tessera/data/text_dataset.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/schedule/interleaved_one_f_one_b.hpp"
#include "tessera/optim/nonfinite_check.hpp"
#include "tessera/tessera.hpp"
#include "tessera/testing/compare.hpp"

using namespace tessera;
using namespace train_gpt;
using Clock = std::chrono::steady_clock;

// Set when the first training step starts: an error before it comes from the command line
// or its files (exit code 2), an error after it from the run (exit code 1).
std::atomic<bool> training_started{false};
// --inject-fault: when the faulty rank threw (seconds on the steady clock; < 0: not yet).
std::atomic<double> fault_thrown_at{-1.0};
double now_seconds() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

checkpoint::CheckpointMeta meta_of(const Args& a, int step) {
  checkpoint::CheckpointMeta m;
  m.config = checkpoint::gpt2_config_json(a.config());
  m.step = step;
  m.extra = {{"seed", a.seed}, {"batch", a.batch}, {"lr", a.lr}, {"min_lr", a.min_lr}, {"warmup", a.warmup},
             {"schedule_steps", a.schedule_steps > 0 ? a.schedule_steps : a.steps}};
  return m;
}

// Trains on this rank of `world` (dp x pp x tp = world size) and returns the per-step losses
// (the same on every rank) and the loss curve. Inner: optim::AdamW<float> (checkpoints hold its
// state) or optim::SGD<float> (--optimizer sgd).
template <class Inner>
std::vector<Point> train_rank(Comm& world, const Args& a, bool print) {
  constexpr bool adamw = std::is_same_v<Inner, optim::AdamW<float>>;
  Mesh mesh(world, MeshShape{.dp = a.dp, .pp = a.pp, .tp = a.tp});
  const bool rank0 = world.rank() == 0 && print;
  const auto dataset = shared_dataset(a.data, a.context);  // one copy for the thread ranks
  const data::TextDataset& ds = *dataset;
  HybridGPT<float> model(mesh, a.config(), a.seed, a.hybrid(), std::nullopt, {.sequence_parallel = a.sequence_parallel});
  // AdamW (or SGD) outside the model: no weight decay on biases and LayerNorm weights (GPT
  // recipes), the state sharded over dp with --zero 1 (--zero1), the gradients too with --zero 2.
  DistributedOptimizer<Inner> opt(model, [&] {
    if constexpr (adamw) return a.adamw_groups(model.parameters());
    else return a.sgd_groups(model.parameters());
  }(), a.zero_stage());
  MemoryTracker::this_rank().reset_peaks();  // --memory-report: training's peaks, not the setup's
  const optim::WarmupCosine lr = a.lr_schedule();
  // --compress / --sync-every: how the dp replicas communicate (gpt/dp_communication.hpp).
  DpCommunication dp_comm(model, mesh.dp(), a);
  // A NaN or Inf in the loss or a gradient stops the run naming the step and the parameter,
  // or skips the step (--on-nonfinite skip), decided in the gradient-norm reduction.
  optim::NonfiniteCheck<float> nonfinite(a.on_nonfinite == "skip" ? optim::OnNonfinite::skip : optim::OnNonfinite::stop,
                                         a.max_consecutive_skips);
  std::ofstream json_log;  // --log-json: one object per step, flushed per line (rank 0)
  if (rank0 && !a.log_json.empty()) json_log.open(a.log_json, std::ios::trunc);

  int start = 0;
  // (--optimizer sgd refuses --resume and --save before any rank starts: checkpoints hold AdamW's state)
  if constexpr (adamw) {
    if (!a.resume.empty()) {
      opt.gather_full_parameters();  // --zero 3: load into the gathered values, keep this rank's block
      const auto info = checkpoint::load_hybrid_checkpoint(a.resume, model, opt, checkpoint::gpt2_config_json(a.config()));
      opt.release_full_parameters(true);
      start = static_cast<int>(info.step);
      if (rank0)
        std::printf("resumed %s: step %d, saved at dp=%d pp=%d tp=%d, now dp=%d pp=%d tp=%d\n", a.resume.c_str(), start,
                    info.layout.dp, info.layout.pp, info.layout.tp, a.dp, a.pp, a.tp);
      // The compressors' residuals and DiLoCo's state, saved per rank beside the shards: taken at
      // the same layout (bitwise continuation), else restarted with a note.
      dp_comm.load_state(a.resume, world, mesh, model, opt, a, start, rank0);
    }
  }
  std::int64_t n_params = 0;
  // A PowerSGD rank too large for every matrix compresses nothing: the run is the fp32 all-reduce.
  const int powersgd_rank = a.dp > 1 && a.compress.rfind("powersgd", 0) == 0
                                ? dynamic_cast<const PowerSGDHook<float>&>(*make_comm_hook<float>(a.compress)).options().rank
                                : 0;
  bool powersgd_compresses = false;
  opt.gather_full_parameters();  // --zero 3: the values are freed between uses
  for (const Parameter<float>& p : model.parameters()) {
    n_params += p.value.numel();
    powersgd_compresses = powersgd_compresses || PowerSGDHook<float>::compresses(p.value.shape(), powersgd_rank);
  }
  opt.release_full_parameters(false);
  if (rank0 && powersgd_rank > 0 && !powersgd_compresses)
    std::printf("train_gpt: note: --compress %s compresses no gradient of this model (rank %d is too large for every "
                "matrix: r (n + m) >= n m), so every bucket is all-reduced uncompressed\n", a.compress.c_str(),
                powersgd_rank);
  MemoryTracker::this_rank().reset_peaks();  // --memory-report: not the whole model gathered just above
  GradBuckets<float>::reset_rank_peak_gathered_bytes();
  if (rank0 && a.dp > 1) {
    std::size_t buckets = 0;  // rank 0's stages' (--bucket-mb: the cap; a larger parameter is a bucket alone)
    for (GradBuckets<float>* b : model.buckets()) buckets += b->buckets().size();
    std::printf("dp communication: %s; %zu gradient bucket(s) on rank 0 (--bucket-mb %g)\n", dp_comm.describe(a).c_str(),
                buckets, a.bucket_mb);
  }
  if (rank0)
    std::printf("GPT %d layers, d_model %d, %d heads, context %d; dp=%d pp=%d tp=%d (%s, %d micro-batches, accum %d%s); "
                "global batch %d x %d; rank 0 holds %lld parameters%s%s; %s\n",
                a.layers, a.d_model, a.heads, a.context, a.dp, a.pp, a.tp, a.schedule.c_str(), a.num_microbatches(),
                a.accum, a.zero_stage() == ZeroStage::parameters ? ", ZeRO-3" : a.zero_stage() == ZeroStage::gradients ? ", ZeRO-2" : a.zero_stage() == ZeroStage::optimizer ? ", ZeRO-1" : "", a.batch, a.context, static_cast<long long>(n_params),
                a.zero_stage() == ZeroStage::parameters && a.dp > 1 ? " (ZeRO-3: 1/dp of them stored per rank)" : "",
                a.sequence_parallel && a.tp > 1 ? "; sequence parallel" : "",
                adamw ? "AdamW" : detail::str("SGD, momentum ", a.momentum).c_str());

  const int rows = a.batch / a.dp, chunk = rows / a.accum, r0 = mesh.coord().dp * rows;
  std::vector<Point> curve;
  training_started = true;
  const auto t_start = Clock::now();
  double tokens = 0, elapsed = 0, compute = 0, comm = 0, bubble = 0;
  for (int step = start; step < a.steps; ++step) {
    const auto t0 = Clock::now();
    const data::Batch b = ds.batch(data::Split::train, a.seed, step, a.batch, r0, r0 + rows);
    model.zero_grad();
    double c = 0, m = 0, w = 0;
    // --inject-fault throw@STEP:RANK: this rank fails mid-run, between collectives (the others
    // wait for it in this step's first tp collective, pipeline receive or dp reduction).
    if (step == a.fault_step && world.rank() == a.fault_rank) {
      fault_thrown_at = now_seconds();
      throw Error(detail::str("train_gpt: injected fault (--inject-fault ", a.inject_fault, "): world rank ", a.fault_rank,
                              " throws before step ", step, "'s forward"));
    }
    for (int k = 0; k < a.accum; ++k) {
      const Tensor<std::int32_t> x = b.inputs.slice(0, k * chunk, (k + 1) * chunk).contiguous();
      const Tensor<std::int32_t> y = b.targets.slice(0, k * chunk, (k + 1) * chunk).contiguous();
      // The rows' place in the global batch: dropout draws the masks of the single-rank run.
      model.forward_backward(x, y, BatchPosition{.step = static_cast<std::uint64_t>(step), .first_row = r0 + k * chunk});
      const HybridStepStats& s = model.last_step();
      c += s.compute_seconds;
      m += s.tp_comm_seconds + s.dp_comm_seconds;
      w += s.pp_wait_seconds;
    }
    const double loss = model.accumulated_loss();
    const optim::NonfiniteVerdict v = nonfinite.check(step, loss, model.gradients(), model.parameters());
    if (v.finite) {
      // The norm just reduced; with --sync-every each replica's own (DpCommunication::clip_norm).
      if (a.clip > 0) optim::scale_by_norm(model.gradients(), a.clip, dp_comm.clip_norm(model, mesh, v.grad_norm));
      opt.set_lr(lr(step));
      opt.step();
      if (opt.zero1()) m += opt.seconds();  // the parameter all-gather
    } else if (rank0 && !a.quiet) {
      std::printf("step %4d  skipped (%lld so far): %s\n", step, static_cast<long long>(nonfinite.skipped_steps()),
                  nonfinite.last_message().c_str());
    }
    dp_comm.after_step();  // DiLoCo: every H steps, the outer step over dp
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    tokens += static_cast<double>(a.batch) * a.context;
    elapsed += dt;
    compute += c;
    comm += m;
    bubble += w;
    Point pt{step, loss, -1.0};
    const bool last = step == a.steps - 1;
    if (a.val_every > 0 && (step % a.val_every == 0 || last)) pt.val = validation_loss(model, ds, a);
    if (v.finite) curve.push_back(pt);
    if (json_log.is_open()) {
      nlohmann::json j = {{"step", step}, {"loss", loss}, {"lr", lr(step)}, {"tokens_per_s", a.batch * a.context / dt},
                          {"grad_norm", v.grad_norm}, {"skipped", !v.finite}, {"skipped_steps", nonfinite.skipped_steps()},
                          {"step_seconds", dt}, {"compute_seconds", c}, {"comm_seconds", m}, {"pp_wait_seconds", w}};
      if (pt.has_val()) j["val_loss"] = pt.val;  // NaN: null
      json_log << j.dump() << std::endl;  // a dashboard reads each line as it is written
      // A failed write (disk full, file gone) stops the run as a Python logger's OSError would:
      // exit code 1 after this step, one line naming the file (the other ranks stop with it).
      TESSERA_EXPECTS(json_log.good(), "train_gpt: cannot write --log-json ", a.log_json, " at step ", step,
                      " (disk full or the file is gone); stopping");
    }
    if (rank0 && !a.quiet && (step % a.log_every == 0 || last)) {
      // Shares of rank 0's step time: compute (forward, backward, optimizer), communication
      // (tp collectives, dp gradient reduction, ZeRO-1 gather) and pipeline waits (bubble and
      // activation transfers), over the steps since the last line.
      const double other = std::max(0.0, elapsed - compute - comm - bubble);
      std::printf("step %4d  loss %.4f  lr %.2e  %6.0f tokens/s  compute %3.0f%%  comm %3.0f%%  bubble %3.0f%%  "
                  "dp %.3g MB/step\n", step, loss, lr(step), tokens / elapsed, 100 * (compute + other) / elapsed,
                  100 * comm / elapsed, 100 * bubble / elapsed, dp_comm.take_bytes_per_step() / 1e6);
      tokens = elapsed = compute = comm = bubble = 0;
    }
    if (rank0 && pt.has_val()) std::printf("step %4d  validation loss %.4f\n", step, pt.val);
    if constexpr (adamw) {
      if (!a.save.empty() && ((a.save_every > 0 && (step + 1) % a.save_every == 0) || last)) {
        opt.gather_full_parameters();  // --zero 3 (nothing otherwise)
        checkpoint::save_hybrid_checkpoint(a.save, model, opt, meta_of(a, step + 1));
        dp_comm.save_state(a.save, world, mesh, model, opt, a, step + 1);  // residuals, DiLoCo state
        opt.release_full_parameters(false);
        if (rank0 && !a.quiet) std::printf("step %4d  saved %s\n", step, a.save.c_str());
      }
    }
  }
  if (rank0 && a.dp > 1 && dp_comm.total_steps() > 0)
    std::printf("dp sent %.4g MB/step over %lld steps (%s)\n", dp_comm.total_bytes_per_step() / 1e6,
                static_cast<long long>(dp_comm.total_steps()), dp_comm.describe(a).c_str());
  if (rank0 && a.steps > start)
    std::printf("trained steps %d..%d in %.1f s%s\n", start, a.steps - 1,
                std::chrono::duration<double>(Clock::now() - t_start).count(),
                nonfinite.skipped_steps() > 0
                    ? detail::str(" (", nonfinite.skipped_steps(), " skipped: non-finite values)").c_str()
                    : "");
  if (a.sample_len > 0) {
    const std::string text = sample(model, a);
    if (rank0) {
      std::printf("--- sample ---\n");
      print_sample(text);
      std::printf("\n--------------\n");
    }
  }
  if (a.memory_report) print_memory_report(world, world.rank() == 0 && print);
  if (a.memory_report && a.zero_stage() == ZeroStage::parameters) {
    // ZeRO-3's gathered units (part of comm_buffers above) on a line of their own: the most
    // bytes of gathered values alive at once on a rank, all its units together, over the ranks,
    // and the largest unit (4 B per parameter of it, padded).
    double gathered[3] = {static_cast<double>(GradBuckets<float>::rank_peak_gathered_bytes()),
                          static_cast<double>(GradBuckets<float>::rank_gathered_bytes()), 0};  // peak, live, unit
    for (GradBuckets<float>* b : model.buckets()) {
      double unit = 0;
      for (std::size_t k = 0; k < b->buckets().size(); ++k) unit += static_cast<double>(b->shard_size(k) * a.dp) * sizeof(float);
      gathered[2] = std::max(gathered[2], unit);
    }
    world.all_reduce(std::span<double>(gathered, 3), ReduceOp::max);
    if (world.rank() == 0 && print)
      std::printf("ZeRO-3 gathered units (in comm_buffers), MiB, largest rank: %.3f peak / %.3f live; largest unit %.3f "
                  "(%zu units on rank 0, --zero3-unit %s)\n",
                  gathered[0] / (1024.0 * 1024.0), gathered[1] / (1024.0 * 1024.0), gathered[2] / (1024.0 * 1024.0),
                  model.buckets().size(), a.zero3_unit.c_str());
  }
  return curve;
}

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"Train a GPT on a text file with tessera across dp x pp x tp ranks (byte-level tokens). The default "
               "layout is dp 2 (two thread ranks); --dp 1 trains serially, scripts/main_job.sh runs the main job "
               "(dp 2 x pp 2 x tp 2)"};
  // A flag given twice takes its last value (scripts/main_job.sh's options are overridden by the
  // ones after them, as with argparse), and --help shows every default.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)->always_capture_default();
  add_options(app, a);
  // A number flag given an empty value (--lr '') is an error, not the default kept.
  for (CLI::Option* o : app.get_options())
    if (o->get_type_name().rfind("FLOAT", 0) == 0 || o->get_type_name().rfind("UINT", 0) == 0)
      o->check(CLI::Validator([](std::string& v) { return v.empty() ? std::string("an empty value is not a number") : std::string(); }, ""));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help exits 0; a bad flag or value is a usage error: one line on stderr, exit code 2.
    if (e.get_exit_code() == 0) return app.exit(e);
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    std::fprintf(stderr, "train_gpt: %s (--help lists the flags)\n", what.c_str());
    return 2;
  }
  // An empty value is an error, not the flag left out (a script's unset variable must not
  // silently train from scratch, save nothing or log nowhere); --prompt may be empty.
  for (const CLI::Option* o : app.get_options()) {
    if (o->count() == 0 || o->get_type_name().empty() || o->check_name("--prompt")) continue;
    for (const std::string& v : o->results())
      if (v.empty()) {
        // (get_name() is "" for a flag outside --help's groups: name it by its long name)
        const std::string name = o->get_lnames().empty() ? o->get_name() : "--" + o->get_lnames().front();
        std::fprintf(stderr, "train_gpt: %s was given an empty value (leave the flag out for its default)\n",
                     name.c_str());
        return 2;
      }
  }
  a.heads_given = app.count("--heads") > 0;
  if (a.model == "gpt2-124m") {  // GPT-2 small; byte tokens: a vocabulary of 256, a multiple of 128
    if (app.count("--layers") == 0) a.layers = 12;
    if (app.count("--d-model") == 0) a.d_model = 768;
    if (app.count("--heads") == 0) a.heads = 12;
    if (app.count("--context") == 0) a.context = 1024;
    a.heads_given = true;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines appear as they are printed, even through a pipe
  try {
    namespace fs = std::filesystem;
    if (a.device == "cuda") {
      // dp x tp x pp ranks as threads, one GPU each (NCCL) or sharing GPU 0 (ThreadDeviceComm);
      // or, with --backend mpi, as processes, one GPU each (NCCL; the process's local rank on its node).
      for (const char* flag : {"--recompute", "--zero3-unit", "--memory-report", "--outer-lr", "--outer-momentum",
                               "--freeze-variance", "--inject-fault"})
        TESSERA_EXPECTS(app.count(flag) == 0, "train_gpt: ", flag, " is not used on the device (--device cuda trains "
                        "without recomputation, the CPU's ZeRO-3 units, memory reports, DiLoCo or fault injection); "
                        "drop it");
      TESSERA_EXPECTS(a.pp > 1 || (app.count("--schedule") == 0 && app.count("--microbatches") == 0 &&
                                   app.count("--virtual-stages") == 0),
                      "train_gpt: --schedule, --microbatches and --virtual-stages are for a pipeline (--pp 2 or more)");
      TESSERA_EXPECTS(a.virtual_stages == 1 || a.schedule == "interleaved", "train_gpt: --virtual-stages ",
                      a.virtual_stages, " is for --schedule interleaved (got --schedule ", a.schedule, ")");
      if (a.pp > 1) {
        TESSERA_EXPECTS(a.accum == 1, "train_gpt: --device cuda --pp ", a.pp, " accumulates over the pipeline's "
                        "micro-batches; give --microbatches ", a.accum * a.num_microbatches(), " instead of --accum ",
                        a.accum);
        TESSERA_EXPECTS(a.pp * a.virtual_stages <= a.layers + 2, "train_gpt: --pp ", a.pp, " x --virtual-stages ",
                        a.virtual_stages, " = ", a.pp * a.virtual_stages, " stages, but a GPT of ", a.layers,
                        " layers has ", a.layers + 2, " pipeline layers (embedding, blocks, head)");
        if (a.schedule == "interleaved")  // its micro-batch count rules, checked before any rank starts
          (void)schedule::InterleavedOneFOneB{a.num_microbatches(), a.virtual_stages}.build(a.pp);
      }
      TESSERA_EXPECTS(a.heads % a.tp == 0, "train_gpt: --tp ", a.tp, " does not divide --heads ", a.heads,
                      " (each tp rank computes heads / tp of the attention heads)");
      TESSERA_EXPECTS(a.attention != "flash" || a.d_model / a.heads <= 128, "train_gpt: --attention flash takes a "
                      "head dimension (--d-model / --heads = ", a.d_model, " / ", a.heads, " = ", a.d_model / a.heads,
                      ") of at most 128");
      TESSERA_EXPECTS(a.plan.empty(), "train_gpt: --plan auto plans CPU ranks; drop it with --device cuda");
      TESSERA_EXPECTS(a.optimizer == "adamw", "train_gpt: --optimizer ", a.optimizer, " trains on the CPU only (the "
                      "device path steps AdamW); drop --device cuda or use --optimizer adamw");
      TESSERA_EXPECTS(a.compress.empty() && a.sync_every == 0, "train_gpt: --compress and --sync-every are not "
                      "built on the device yet; drop them with --device cuda");
      TESSERA_EXPECTS(!a.generate && a.eval_model.empty(), "train_gpt: --generate and "
                      "--eval-model run on the CPU; drop --device cuda for them");
      // One GPU trains as one rank unless --dp asks for more (the CPU's default dp 2 is two cores).
      if (app.count("--dp") == 0) a.dp = 1;
      // (At dp 1 ZeRO is off: nothing to refuse.)
      TESSERA_EXPECTS((a.zero_stage() != ZeroStage::gradients && a.zero_stage() != ZeroStage::parameters) || a.pp == 1 ||
                          a.dp == 1 || a.schedule != "zb-h1",
                      "train_gpt: --device cuda --zero ", a.zero_stage() == ZeroStage::gradients ? 2 : 3, " with --schedule zb-h1: its W passes write weight "
                      "gradients after the buckets' reduction; use --zero 1 or another schedule");
      // ThreadDeviceComm joins at most 64 ranks; and no thread starts (nor loads the data) where
      // there is no device.
      TESSERA_EXPECTS(a.dp * a.tp * a.pp <= 64, "train_gpt: --device cuda runs dp x tp x pp = ", a.dp, " x ", a.tp,
                      " x ", a.pp, " = ", a.dp * a.tp * a.pp, " ranks as threads; at most 64");
      TESSERA_EXPECTS(a.pp == 1 || a.batch % (a.dp * a.num_microbatches()) == 0, "train_gpt: --batch ", a.batch,
                      " does not split into --dp ", a.dp, " x ", a.num_microbatches(),
                      " micro-batches of equal size (the device pipeline's stages keep one shape)");
      if (built_with_cuda()) {
        const std::string why = no_device_reason();
        TESSERA_EXPECTS(why.empty(), "train_gpt: no CUDA device: ", why);
      }
      // (After --dp's device default and the device check: a build without CUDA says so first.)
      TESSERA_EXPECTS(a.backend != "mpi" || !built_with_cuda() || built_with_nccl() || a.dp * a.tp * a.pp == 1,
                      "train_gpt: --device cuda --backend mpi joins the processes' GPUs through NCCL, which this build "
                      "lacks (configure with -Dnccl=enabled); threads of one process share GPU 0 without it (drop "
                      "--backend mpi)");
    } else {
      TESSERA_EXPECTS(a.dtype == "fp32", "train_gpt: --dtype ", a.dtype, " is for --device cuda; the CPU trains in fp32");
      TESSERA_EXPECTS(a.attention == "unfused", "train_gpt: --attention ", a.attention, " is for --device cuda (the "
                      "device's fused attention kernels)");
    }
    TESSERA_EXPECTS(a.plan_tolerance >= 0 && a.plan_tolerance <= 1, "train_gpt: --plan-tolerance must be a fraction in "
                    "[0, 1], got ", a.plan_tolerance);  // NaN passes CLI11's range
    if (a.plan == "auto") {
      // The plan sets dp, tp, pp, schedule, micro-batches, accumulation, recomputation, ZeRO and
      // sequence parallelism: say which flags given on the command line it overrides.
      const Args given = a;
      apply_auto_plan(a);
      std::string overridden;
      const auto note = [&](const char* flag, const auto& before, const auto& after) {
        if (app.count(flag) > 0 && before != after) overridden += detail::str(" ", flag, " ", before, " -> ", after, ";");
      };
      note("--dp", given.dp, a.dp);
      note("--tp", given.tp, a.tp);
      note("--pp", given.pp, a.pp);
      note("--schedule", given.schedule, a.schedule);
      note("--virtual-stages", given.virtual_stages, a.virtual_stages);
      note("--microbatches", given.microbatches, a.microbatches);
      note("--accum", given.accum, a.accum);
      note("--recompute", given.recompute, a.recompute);
      note("--zero", given.zero, a.zero);
      note("--zero1", given.zero1, a.zero1);
      note("--sequence-parallel", given.sequence_parallel, a.sequence_parallel);
      if (!overridden.empty() && prints()) {
        overridden.pop_back();
        std::printf("plan auto: note: the plan overrides flags given on the command line:%s\n", overridden.c_str());
      }
    }
    TESSERA_EXPECTS(a.world_size == 0 || a.world() == a.world_size, "train_gpt: --world ", a.world_size,
                    " is not dp x tp x pp = ", a.world(), " (--world is for --plan auto)");
    TESSERA_EXPECTS(a.cluster.empty() || a.plan == "auto", "train_gpt: --cluster ", a.cluster,
                    " is read only by --plan auto, which is not given");
    TESSERA_EXPECTS(!a.plan_tolerance_given || a.plan == "auto", "train_gpt: --plan-tolerance ", a.plan_tolerance,
                    " is read only by --plan auto, which is not given");
    // --backend mpi started without a launcher: MPI_Init would start a singleton, then abort on
    // the layout. One line instead (the variables Open MPI, MPICH/Hydra, PMIx and Slurm set).
    if (a.backend == "mpi") {
      bool launched = false;
      for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS", "SLURM_PROCID"})
        launched = launched || std::getenv(var) != nullptr;
      TESSERA_EXPECTS(launched, "train_gpt: --backend mpi was not started by mpirun: run under mpirun -np ", a.world(),
                      " (dp x tp x pp), or use --backend threads (no launcher needed)");
    }
    // Started by mpirun without --backend mpi: every process would run the whole job alone.
    for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
      if (const char* n = std::getenv(var); n != nullptr && std::atoi(n) > 1 && a.backend != "mpi")
        throw Error(detail::str("train_gpt: started by mpirun as ", n, " processes but --backend is ", a.backend,
                                ": pass --backend mpi (or run without mpirun: the threads backend needs no launcher)"));
    // The collectives' timeout, read by the communicators' own rule (comm/communicator.hpp):
    // refused here as a usage error before any rank starts.
    try {
      (void)default_timeout();
    } catch (const Error& e) {
      std::string why = e.what();
      if (const std::size_t at = why.rfind(" ["); at != std::string::npos) why.erase(at);  // the library's file:line
      throw Error(detail::str("train_gpt: ", why));
    }
    TESSERA_EXPECTS(std::isfinite(a.lr) && a.lr > 0, "train_gpt: --lr ", a.lr, " must be a finite positive number");
    TESSERA_EXPECTS(std::isfinite(a.min_lr) && a.min_lr >= 0 && a.min_lr <= a.lr, "train_gpt: --min-lr ", a.min_lr,
                    " must be in [0, --lr ", a.lr, "]");
    TESSERA_EXPECTS(std::isfinite(a.bucket_mb) && a.bucket_mb * 1048576.0 >= sizeof(float) && a.bucket_mb <= 65536,
                    "train_gpt: --bucket-mb ", a.bucket_mb, " must be a number of MiB from ", sizeof(float) / 1048576.0,
                    " (one fp32 element) to 65536");
    TESSERA_EXPECTS(std::isfinite(a.clip) && a.clip >= 0, "train_gpt: --clip ", a.clip, " must be a finite number >= 0 (0: no clipping)");
    TESSERA_EXPECTS(std::isfinite(a.weight_decay) && a.weight_decay >= 0, "train_gpt: --weight-decay ", a.weight_decay,
                    " must be a finite number >= 0");
    TESSERA_EXPECTS(std::isfinite(a.dropout) && a.dropout >= 0 && a.dropout < 1, "train_gpt: --dropout ", a.dropout,
                    " must be in [0, 1)");
    // (in fp32, as the optimizer holds it: 0.99999999 would round to 1)
    TESSERA_EXPECTS(std::isfinite(a.momentum) && a.momentum >= 0 && static_cast<float>(a.momentum) < 1,
                    "train_gpt: --momentum ", a.momentum, " must be in [0, 1) (in fp32)");
    TESSERA_EXPECTS(a.optimizer == "sgd" || app.count("--momentum") == 0, "train_gpt: --momentum ", a.momentum,
                    " is SGD's; add --optimizer sgd (AdamW's betas are fixed at 0.9 and 0.999)");
    if (a.optimizer == "sgd") {
      // Checkpoints and the device path hold AdamW's state; SGD trains on the CPU from scratch.
      for (const char* flag : {"--save", "--save-every", "--resume", "--freeze-variance"})
        TESSERA_EXPECTS(app.count(flag) == 0 || (a.generate && std::string(flag) == "--resume"), "train_gpt: ", flag,
                        " is not available with --optimizer sgd (",
                        std::string(flag) == "--freeze-variance" ? "it freezes AdamW's second moment"
                                                                 : "checkpoints hold AdamW's state only",
                        "); drop it or use --optimizer adamw");
      // (--device cuda with sgd is refused first, in the device checks above)
    }
    if (!a.compress.empty()) (void)make_comm_hook<float>(a.compress);  // a bad name is a usage error now
    DpCommunication::check_flags(a);  // --compress at tp/pp > 1, --freeze-variance before the warm-up ends
    TESSERA_EXPECTS(a.sync_every == 0 || a.zero_stage() == ZeroStage::none, "train_gpt: --sync-every ", a.sync_every,
                    " needs whole optimizer state on every replica: drop --zero1 / --zero");
    TESSERA_EXPECTS(std::isfinite(a.outer_lr) && a.outer_lr > 0, "train_gpt: --outer-lr ", a.outer_lr, " must be a finite positive number");
    TESSERA_EXPECTS(std::isfinite(a.outer_momentum) && a.outer_momentum >= 0 && a.outer_momentum < 1,
                    "train_gpt: --outer-momentum ", a.outer_momentum, " must be in [0, 1)");
    TESSERA_EXPECTS(std::isfinite(a.temperature) && a.temperature > 0, "train_gpt: --temperature ", a.temperature,
                    " must be a finite positive number");
    TESSERA_EXPECTS(a.backend == "mpi" || a.world() <= 4096, "train_gpt: dp x pp x tp = ", a.world(),
                    " ranks; the threads backend starts one thread per rank, at most 4096 here");
    TESSERA_EXPECTS(a.sample_len == 0 || !a.prompt.empty(), "train_gpt: --prompt is empty; sampling starts from it "
                    "(or pass --sample-len 0)");
    if (!a.inject_fault.empty()) {
      // throw@STEP:RANK (docs/reliability.md: fault injection)
      int step = -1, rank = -1, used = 0;
      const bool parsed = std::sscanf(a.inject_fault.c_str(), "throw@%d:%d%n", &step, &rank, &used) == 2 &&
                          used == static_cast<int>(a.inject_fault.size());
      TESSERA_EXPECTS(parsed && step >= 0 && rank >= 0 && rank < a.world(), "train_gpt: --inject-fault '",
                      a.inject_fault, "' is not throw@STEP:RANK with STEP >= 0 and RANK in [0, dp x tp x pp = ",
                      a.world(), ")");
      TESSERA_EXPECTS(!a.generate && a.eval_model.empty(), "train_gpt: --inject-fault ", a.inject_fault,
                      " faults a training step; --generate and --eval-model train none");
      TESSERA_EXPECTS(step < a.steps, "train_gpt: --inject-fault ", a.inject_fault, ": step ", step,
                      " is not trained (--steps ", a.steps, " trains steps 0..", a.steps - 1, ")");
      a.fault_step = step;
      a.fault_rank = rank;
    }
    // Flags that do nothing at this layout: a one-line note each, the run goes on.
    {
      std::vector<std::string> notes;
      if (a.dp == 1 && a.zero_stage() != ZeroStage::none)
        notes.push_back("--zero/--zero1 at dp 1: one replica holds the whole optimizer state and gradients anyway "
                        "(ZeRO shards over dp)");
      const auto topk = DpCommunication::top_k(a);
      const double dgc_momentum = topk ? topk->momentum() : 0.0;
      if (a.dp == 1 && !a.compress.empty())
        notes.push_back(detail::str("--compress ", a.compress, " at dp 1: there is no dp gradient reduction to compress",
                                    dgc_momentum > 0 ? ", so its momentum correction is off too and SGD runs without "
                                                       "momentum (use --momentum instead)" : ""));
      if (a.dp > 1 && dgc_momentum > 0 && topk->fraction() == 1)
        notes.push_back(detail::str("--compress ", a.compress, ": at fraction 1 every entry is sent each step and the "
                                    "momentum factor masking resets the velocity, so the steps are SGD without momentum "
                                    "(use --momentum M without a compressor instead)"));
      if (a.dp > 1 && dgc_momentum > 0 && a.clip > 0)
        notes.push_back(detail::str("--clip ", a.clip, " with --compress ", a.compress, " clips the summed sparse "
                                    "velocities SGD applies, not each rank's gradient (DGC's local clipping); --clip 0 "
                                    "turns it off"));
      if (a.dp > 1 && a.zero_stage() == ZeroStage::optimizer && a.optimizer == "sgd" && a.momentum == 0)
        notes.push_back("--zero 1 with --optimizer sgd --momentum 0: SGD without momentum keeps no optimizer state, so "
                        "there is nothing to shard (the steps are as without --zero)");
      if (a.dp > 1 && topk && topk->sparsity_warmup_steps() > 0 && topk->fraction() >= 0.25)
        notes.push_back(detail::str("--compress ", a.compress, ": the sparsity warm-up's stages send 1/4, 1/16, 1/64 "
                                    "and 1/256 of the entries but never less than the fraction ", topk->fraction(),
                                    ", so at a fraction of 1/4 or more it changes nothing"));
      if (a.plan == "auto" && a.optimizer == "sgd")
        notes.push_back("--plan auto with --optimizer sgd: the planner's memory model counts AdamW's two moments per "
                        "parameter (SGD keeps one momentum buffer or none), so its memory figures are upper bounds");
      if (a.on_nonfinite != "skip" && app.count("--max-consecutive-skips") > 0)
        notes.push_back(detail::str("--max-consecutive-skips ", a.max_consecutive_skips, " without --on-nonfinite skip: "
                                    "the first non-finite step stops the run"));
      if (a.dp == 1 && app.count("--bucket-mb") > 0)
        notes.push_back(detail::str("--bucket-mb ", a.bucket_mb, " at dp 1: there is no dp gradient reduction to bucket"));
      if (a.dp > 1 && a.sync_every > a.steps)
        notes.push_back(detail::str("--sync-every ", a.sync_every, " is more than --steps ", a.steps,
                                    ": the replicas never synchronize (each trains alone; validation, samples and "
                                    "checkpoints show dp rank 0's replica)"));
      if (a.dp > 1 && a.sync_every > 0 && a.sync_every <= a.steps && a.steps % a.sync_every != 0 && a.resume.empty())
        notes.push_back(detail::str("--sync-every ", a.sync_every, " does not divide --steps ", a.steps, ": the last ",
                                    a.steps % a.sync_every, " step(s) are not synchronized (the final validation, samples "
                                    "and checkpoint show dp rank 0's replica)"));
      // Top-k's all-gathers of (index, value) pairs send (dp - 1) k 8 bytes per bucket, the fp32
      // all-reduce 2 (dp - 1) / dp n 4 and ZeRO-3's reduce-scatter half of that.
      if (const int den = a.zero == 3 ? 2 * a.dp : a.dp;
          a.dp > 1 && topk && topk->fraction() * den >= 1 && !(dgc_momentum > 0 && topk->fraction() == 1))
        notes.push_back(detail::str("--compress ", a.compress, " at dp ", a.dp, ": (index, value) pairs of a fraction of 1/",
                                    den, " or more are as many bytes as ", a.zero == 3 ? "ZeRO-3's fp32 reduce-scatter"
                                    : "the fp32 all-reduce", " or more; top-k saves bytes only below that"));
      if (a.dp == 1 && a.sync_every > 0)
        notes.push_back(detail::str("--sync-every ", a.sync_every, " at dp 1: there are no replicas to average; the outer "
                                    "Nesterov step acts on the one replica's progress alone"));
      if (a.sync_every == 0 && app.count("--outer-lr") + app.count("--outer-momentum") > 0)
        notes.push_back("--outer-lr/--outer-momentum without --sync-every: DiLoCo's outer step is off (synchronous "
                        "data parallelism has no outer optimizer)");
      if (const int total = a.schedule_steps > 0 ? a.schedule_steps : a.steps; app.count("--warmup") > 0 && a.warmup > total)
        notes.push_back(detail::str("--warmup ", a.warmup, " is longer than the ", total,
                                    "-step learning-rate schedule: warmup is capped at ", total, " steps"));
      if (a.tp == 1 && a.sequence_parallel)
        notes.push_back("--sequence-parallel at tp 1: there is no tp group to split the sequence over");
      if (a.pp == 1 && a.schedule == "zb-h1")
        notes.push_back("--schedule zb-h1 at pp 1: one stage has no pipeline bubble to fill; it trains as 1F1B does");
      if (app.count("--zero3-unit") > 0 && a.zero_stage() != ZeroStage::parameters)
        notes.push_back(detail::str("--zero3-unit ", a.zero3_unit, " without --zero 3: only ZeRO-3 gathers parameters "
                                    "by units"));
      if (a.zero_stage() == ZeroStage::parameters && a.unit_layers() >= a.layers + 2)
        notes.push_back(detail::str("--zero3-unit ", a.zero3_unit, " is at least the model's ", a.layers + 2,
                                    " layers (embedding, ", a.layers, " blocks, head): each stage is one unit, as "
                                    "--zero3-unit stage"));
      if (a.zero_stage() == ZeroStage::parameters && a.unit_layers() > 0 && a.dp > 1 &&
          (a.compress.rfind("powersgd", 0) == 0 || a.compress.rfind("topk", 0) == 0))
        notes.push_back(detail::str("--compress ", a.compress, " with ZeRO-3 per-layer units: each unit's buckets are "
                                    "compressed on their own, so the losses differ from --zero 0/1/2's (same "
                                    "compressor, other bucket boundaries); --zero3-unit stage keeps --zero 2's buckets"));
      if (a.device != "cuda" && prints())
        for (const std::string& n : notes) std::printf("train_gpt: note: %s\n", n.c_str());
    }
    if (!a.eval_model.empty()) {
      TESSERA_EXPECTS(!a.eval_tokens.empty(), "train_gpt: --eval-model needs --eval-tokens");
      for (const char* flag : {"--optimizer", "--momentum", "--compress", "--sync-every"})
        if (app.count(flag) > 0 && prints())
          std::printf("train_gpt: note: %s with --eval-model: it only evaluates the file (nothing is trained, so %s "
                      "does nothing)\n", flag, flag);
      launch(a.backend, a.world(), argc, argv, [&](Comm& world) { eval_rank(world, a); });
      return 0;
    }
    TESSERA_EXPECTS(a.d_model % a.heads == 0, "train_gpt: d_model ", a.d_model, " is not divisible by heads ", a.heads);
    TESSERA_EXPECTS(a.heads % a.tp == 0, "train_gpt: tp ", a.tp, " does not divide the ", a.heads, " heads");
    TESSERA_EXPECTS(!a.sequence_parallel || a.context % a.tp == 0, "train_gpt: --sequence-parallel needs tp ", a.tp,
                    " to divide --context ", a.context);
    // Interleaving splits each pipeline rank's layers into chunks; at pp 1 the one rank's two
    // chunks would hold the tied embedding twice (its checkpoint could not be resumed).
    TESSERA_EXPECTS(a.pp > 1 || a.virtual_stages == 1, "train_gpt: --virtual-stages ", a.virtual_stages,
                    " at pp 1: interleaving splits a pipeline rank's layers into chunks, and one stage is no "
                    "pipeline; give --pp 2 or more, or drop --virtual-stages");
    TESSERA_EXPECTS(a.pp * a.virtual_stages <= a.layers + 2, "train_gpt: pp(", a.pp, ") x virtual stages(",
                    a.virtual_stages, ") exceeds the ", a.layers + 2, " pipeline layers (embedding, ", a.layers,
                    " blocks, head)");
    if (a.generate) {
      TESSERA_EXPECTS(!a.resume.empty(), "train_gpt: --generate needs --resume DIR");
      TESSERA_EXPECTS(a.sample_len > 0, "train_gpt: --generate --sample-len 0 samples nothing; give --sample-len N");
      // Training's outputs: --generate trains nothing, so they would stay unwritten.
      for (const char* flag : {"--save", "--save-every", "--log-json", "--loss-csv", "--loss-svg", "--verify",
                               "--compress", "--sync-every", "--on-nonfinite", "--optimizer", "--momentum"})
        if (app.count(flag) > 0 && prints())
          std::printf("train_gpt: note: %s with --generate: it only samples from the checkpoint (nothing is trained, "
                      "so %s does nothing)\n", flag, flag);
      launch(a.backend, a.world(), argc, argv, [&](Comm& world) { generate_rank(world, a); });
      return 0;
    }
    TESSERA_EXPECTS(fs::is_regular_file(a.data), "train_gpt: the text file ", a.data,
                    fs::exists(a.data) ? " is not a regular file" : " does not exist",
                    " (bash scripts/main_job.sh writes data/kjv.txt)");
    TESSERA_EXPECTS(a.batch % (a.dp * a.accum) == 0, "train_gpt: global batch ", a.batch,
                    " is not divisible by dp(", a.dp, ") x accum(", a.accum, ") = ", a.dp * a.accum);
    TESSERA_EXPECTS(a.batch / (a.dp * a.accum) >= a.num_microbatches(), "train_gpt: each forward/backward gets ",
                    a.batch / (a.dp * a.accum), " sequences (batch ", a.batch, " / dp ", a.dp, " / accum ", a.accum,
                    "), fewer than the ", a.num_microbatches(), " micro-batches");
    if (a.pp > 1 && a.schedule == "interleaved") {  // the schedule's own check, before the ranks start
      try {
        schedule::InterleavedOneFOneB{.num_microbatches = a.num_microbatches(), .virtual_stages = a.virtual_stages}
            .validate(a.pp);
      } catch (const Error& e) {
        std::string why = e.what();
        if (const std::size_t at = why.rfind(" ["); at != std::string::npos) why.erase(at);  // the schedule's file:line
        throw Error(detail::str("train_gpt: --schedule interleaved --pp ", a.pp, " --microbatches ", a.num_microbatches(),
                                ": ", why));
      }
    }
    // What cannot fit is refused before a rank allocates it: an allocation beyond the machine's
    // memory is not always a std::bad_alloc (the kernel may kill the process instead). A lower
    // bound, in bytes: the parameters and their gradients of every dp replica in this process
    // (all of them on the threads backend, 1 / (tp x pp) of one per MPI process), every block's
    // input activation for backward, and one layer's attention probabilities of a micro-batch;
    // on the threads backend, 1 MB per rank (its thread, communicator and model objects:
    // measured 4.27 GB at dp 64 x tp 64 = 4096 ranks of a 2-layer d_model 64 model, session 18).
    {
      const double params = 12.0 * a.d_model * double(a.d_model) * a.layers + (256.0 + a.context) * a.d_model;
      const double replicas = a.backend == "mpi" ? 1.0 / (a.tp * a.pp) : double(a.dp);
      const double per_process = a.backend == "mpi" ? 1.0 / a.world() : 1.0;
      const double rows = double(a.batch) / (a.dp * a.accum * a.num_microbatches());
      const double need = 8.0 * params * replicas +
                          4.0 * double(a.batch) * a.context * double(a.d_model) * a.layers * per_process +
                          4.0 * rows * a.heads * double(a.context) * a.context * (a.backend == "mpi" ? 1.0 / a.tp : double(a.dp)) +
                          (a.backend == "mpi" ? 0.0 : 1e6 * a.world());
      const double have = double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGE_SIZE));
      TESSERA_EXPECTS(need <= have, "train_gpt: --layers ", a.layers, " --d-model ", a.d_model, " --heads ", a.heads,
                      " --context ", a.context, " --batch ", a.batch, " need at least ", need / 1e9,
                      " GB (parameters, gradients, activations, ranks) but this machine has ", have / 1e9, " GB");
    }
    // Output files are checked now, not after the last step.
    const std::pair<const char*, std::string> outputs[] = {{"--loss-csv", a.loss_csv}, {"--loss-svg", a.loss_svg},
                                                           {"--log-json", a.log_json}};
    for (const auto& [flag, path] : outputs) {
      if (path.empty()) continue;
      TESSERA_EXPECTS(!fs::is_directory(path), "train_gpt: ", flag, " ", path, " is a directory, not a file");
      // An output must not overwrite what the run reads or saves: the data, a checkpoint, or
      // another output (the last one written would hold the file).
      std::error_code ec;
      for (const auto& [other, other_path] : outputs)
        TESSERA_EXPECTS(other == flag || other_path.empty() ||
                            fs::weakly_canonical(path, ec) != fs::weakly_canonical(other_path, ec),
                        "train_gpt: ", flag, " ", path, " and ", other, " ", other_path,
                        " are the same file: give each output its own path");
      TESSERA_EXPECTS(a.data.empty() || !fs::equivalent(path, a.data, ec), "train_gpt: ", flag, " ", path,
                      " is the --data file: refusing to overwrite it");
      for (const auto& [dflag, dir] : {std::pair<const char*, std::string>{"--resume", a.resume}, {"--save", a.save}}) {
        if (dir.empty()) continue;
        const fs::path rel = fs::weakly_canonical(path, ec).lexically_relative(fs::weakly_canonical(dir, ec));
        TESSERA_EXPECTS(rel.empty() || *rel.begin() == "..", "train_gpt: ", flag, " ", path, " is inside ", dflag, " ",
                        dir, ": refusing to overwrite a checkpoint's files");
      }
      TESSERA_EXPECTS(std::ofstream(path, std::ios::app).good(), "train_gpt: cannot write ", flag, " ", path);
    }
    if (a.verify) {
      TESSERA_EXPECTS(a.backend == "threads", "train_gpt: --verify runs the serial reference in this process: use the "
                      "threads backend (drop --backend mpi)");
      TESSERA_EXPECTS(a.resume.empty(), "train_gpt: --verify compares a run from step 0; drop --resume");
      TESSERA_EXPECTS(a.dp == 1 || (a.compress.empty() && a.sync_every == 0), "train_gpt: --verify compares with the "
                      "serial run, and ", a.compress.empty() ? "--sync-every" : "--compress", " at dp ", a.dp,
                      " changes the arithmetic (not expected to match it); drop one of them");
      TESSERA_EXPECTS(a.on_nonfinite != "skip", "train_gpt: --verify compares every step with the serial run, which "
                      "takes every step; drop --on-nonfinite skip");
    }
    // Everything a save or resume needs is checked before the first step, not after the last.
    if (!a.save.empty()) {
      const fs::path dir = fs::path(a.save).has_filename() ? fs::path(a.save) : fs::path(a.save).parent_path();
      if (fs::exists(dir)) {
        TESSERA_EXPECTS(fs::is_directory(dir), "train_gpt: --save ", dir, " exists and is not a directory");
        TESSERA_EXPECTS(fs::is_empty(dir) || fs::exists(dir / "index.json"), "train_gpt: --save ", dir,
                        " exists and is neither empty nor a checkpoint: refusing to replace it");
      } else {
        std::error_code ec;
        fs::create_directories(dir.has_parent_path() ? dir.parent_path() : fs::path("."), ec);
        TESSERA_EXPECTS(!ec, "train_gpt: cannot create the parent directory of --save ", dir, ": ", ec.message());
      }
      // The save writes "<dir>.tmp-*" beside it and renames: make sure that can be written now.
      const fs::path probe = dir.string() + ".probe-" + std::to_string(::getpid());
      std::ofstream(probe).put('x');
      std::error_code ec;
      const bool writable = fs::exists(probe, ec) && fs::file_size(probe, ec) == 1;
      fs::remove(probe, ec);
      TESSERA_EXPECTS(writable, "train_gpt: cannot write beside --save ", dir, " (", probe.parent_path(),
                      " is not writable)");
    }
    if (!a.resume.empty()) {
      const checkpoint::CheckpointReader reader(a.resume);
      a.resume_step = reader.info().step;
      // train_gpt steps the optimizer at most once per training step (fewer when a non-finite
      // step was skipped): a larger count means index.json was edited or mixed from two runs.
      TESSERA_EXPECTS(!reader.info().has_optimizer || reader.info().optimizer_step <= a.resume_step, "train_gpt: --resume ",
                      a.resume, ": index.json's optimizer.step ", reader.info().optimizer_step, " is beyond its step ",
                      a.resume_step, " (the optimizer steps at most once per training step)");
      TESSERA_EXPECTS(a.steps > a.resume_step, "train_gpt: --steps ", a.steps, " is not beyond the checkpoint's step ",
                      a.resume_step, " (", a.resume, "); --steps counts all steps, the resumed ones included");
      TESSERA_EXPECTS(a.fault_step < 0 || a.fault_step >= a.resume_step, "train_gpt: --inject-fault ", a.inject_fault,
                      ": step ", a.fault_step, " is not trained (resuming at step ", a.resume_step, " trains steps ",
                      a.resume_step, "..", a.steps - 1, ")");
      // The learning-rate schedule continues where it was unless --schedule-steps says otherwise.
      if (a.schedule_steps == 0 && reader.info().extra.contains("schedule_steps"))
        a.schedule_steps = checkpoint::detail::integer<int>(reader.info().extra["schedule_steps"],
                                                            "the checkpoint's extra.schedule_steps", 1);
    }
    // A schedule shorter than the run (--schedule-steps, or the checkpoint's when resuming with
    // a larger --steps): the steps after it train at --min-lr.
    if (a.schedule_steps > 0 && a.schedule_steps < a.steps && prints())
      std::printf("train_gpt: note: the learning-rate schedule is %d steps (%s), shorter than --steps %d: steps %d..%d "
                  "train at --min-lr %g (give --schedule-steps %d to stretch it)\n",
                  a.schedule_steps, app.count("--schedule-steps") > 0 ? "--schedule-steps" : "the checkpoint's",
                  a.steps, a.schedule_steps, a.steps - 1, a.min_lr, a.steps);
    std::vector<Point> curve;
    if (a.device == "cuda") {
      TESSERA_EXPECTS(built_with_cuda(), "train_gpt: --device cuda: this build has no CUDA device layers (nvcc or "
                      "cuBLASLt was not found when Meson configured); install the CUDA toolkit, configure with -Dcuda=enabled");
      launch(a.backend, a.dp * a.tp * a.pp, argc, argv, [&](Comm& world) {
        auto c = train_on_device(world, a, meta_of, training_started);
        if (world.rank() == 0) curve = std::move(c);
      });
    } else {
      launch(a.backend, a.world(), argc, argv, [&](Comm& world) {
        try {
          auto c = a.optimizer == "sgd" ? train_rank<optim::SGD<float>>(world, a, true)
                                        : train_rank<optim::AdamW<float>>(world, a, true);
          if (world.rank() == 0) curve = std::move(c);
        } catch (const std::exception& e) {
          // --inject-fault: each other rank says how it stopped (the job's error line is the
          // faulty rank's own), and on the threads backend how long after the fault.
          if (a.fault_rank >= 0 && world.rank() != a.fault_rank) {
            const double t = fault_thrown_at.load();
            std::fprintf(stderr, "train_gpt: [inject-fault] world rank %d stopped%s: %s\n", world.rank(),
                         t >= 0 ? detail::str(" ", now_seconds() - t, " s after the fault").c_str() : "", e.what());
          }
          throw;
        }
      });
    }
    if (!curve.empty()) write_curve(a, curve);
    if (a.verify) {
      // Round-off differences grow chaotically over a long run, so the serial check covers the
      // first 20 steps run here (same learning-rate schedule), the window the equivalence tests use.
      const int n = std::min<int>(20, static_cast<int>(curve.size()));
      // One line per step (9 digits, so a script can redo the comparison), then the largest
      // difference; a non-finite loss on either side counts as an infinite difference.
      const std::vector<double> serial = serial_losses(a, n);
      testing::WorstError worst;
      for (int i = 0; i < n; ++i) {
        const double parallel = curve[static_cast<std::size_t>(i)].train, ref = serial[static_cast<std::size_t>(i)];
        const double e = testing::rel_error(parallel, ref);
        worst.add(e);
        std::printf("verify: step %4d  loss %.9g  serial %.9g  relative difference %.3g\n", i, parallel, ref, e);
      }
      std::printf("verify: largest relative loss difference vs the serial run over the first %d steps: %.3g\n", n,
                  worst.value());
      // On the GPU: fp32 (TF32 off) within 1e-4 as any layout; bf16 within its rounding (3%).
      const double tolerance = a.device == "cuda" && a.dtype == "bf16" ? 3e-2 : 1e-4;
      if (a.device == "cuda") std::printf("verify: tolerance %.g (--device cuda --dtype %s)\n", tolerance, a.dtype.c_str());
      if (!(worst.value() < tolerance)) {
        std::printf("verify: FAILED: %.3g exceeds the tolerance %.g%s\n", worst.value(), tolerance,
                    !a.compress.empty() || a.sync_every > 0
                        ? " (--compress powersgd/topk/bf16 and --sync-every change the arithmetic: they are not "
                          "expected to match the serial run)"
                        : "");
        return 1;
      }
    }
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "train_gpt: out of memory for --layers %d --d-model %d --context %d --batch %d (dp %d, pp %d, "
                 "tp %d): about %.3g GB of parameters, gradients and AdamW state for the whole model; lower the sizes or "
                 "spread them over more ranks\n", a.layers, a.d_model, a.context, a.batch, a.dp, a.pp, a.tp,
                 16.0 * (12.0 * a.d_model * double(a.d_model) * a.layers + (256.0 + a.context) * a.d_model) / 1e9);
    return training_started ? 1 : 2;
  } catch (const std::exception& e) {
    std::string what = e.what();
    // A usage error is the message only; an error of the run keeps tessera::Error's [file:line].
    if (const std::size_t at = what.rfind(" ["); !training_started && at != std::string::npos && what.back() == ']')
      what.erase(at);
    std::fprintf(stderr, "%s%s\n", what.rfind("train_gpt:", 0) == 0 ? "" : "train_gpt: ", what.c_str());
    return training_started ? 1 : 2;  // 2: the command line or its files are wrong
  }
  return 0;
}
