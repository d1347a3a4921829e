#pragma once
// train_gpt's options: what to train (model sizes, data), how to lay it out (dp x pp x tp,
// schedule, micro-batches, accumulation, ZeRO-1, backend), the optimizer and its schedule, and
// what to do besides training (validation, sampling, checkpoints, evaluation, verification).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <string>

#include "tessera/data/text_dataset.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/optim/warmup_cosine.hpp"
#include "tessera/parallel/data/zero_optimizer.hpp"
#include "tessera/parallel/hybrid/hybrid.hpp"

namespace train_gpt {

using namespace tessera;

struct Args {
  std::string data = "data/kjv.txt";
  int dp = 2, tp = 1, pp = 1;
  std::string schedule = "1f1b";
  std::string recompute = "none";  // --recompute none|selective|full: activation recomputation of every stage
  int virtual_stages = 1;
  int microbatches = 0;  // 0: pp * virtual_stages (at least 1)
  int accum = 1;
  double bucket_mb = 25;  // --bucket-mb: the dp reduction's gradient bucket size, MiB
  bool zero1 = false;
  int zero = -1;              // --zero 0|1|2|3: ZeRO stage (-1: --zero1 decides)
  std::string zero3_unit = "layer";  // --zero3-unit layer|stage|N: ZeRO-3's unit of gathering
  bool memory_report = false; // --memory-report: each rank's MemoryTracker table at the end
  std::string compress;       // --compress: dp gradient compression ("": the fp32 all-reduce)
  int sync_every = 0;         // --sync-every H: DiLoCo, replicas meet every H steps (0: every step)
  double outer_lr = 0.7, outer_momentum = 0.9;  // DiLoCo's outer SGD (Nesterov)
  int freeze_variance = 0;    // --freeze-variance N: AdamW's second moment frozen after N steps (0: never)
  bool sequence_parallel = false;
  std::string backend = "threads";
  int steps = 300;
  int schedule_steps = 0;  // length of the learning-rate schedule (0: steps)
  int layers = 4, d_model = 128, heads = 4, context = 64;
  int batch = 16;  // global batch (sequences per optimizer step)
  double lr = 1e-3, min_lr = 1e-4, clip = 1.0, weight_decay = 0.0;
  std::string optimizer = "adamw";  // --optimizer adamw|sgd
  double momentum = 0.9;            // --momentum: SGD's (heavy ball, PyTorch's form)
  double dropout = 0.0;  // on the embeddings (GPT-2's embd_pdrop)
  int warmup = 20;
  std::uint64_t seed = 1;
  int val_every = 50, val_batches = 4, log_every = 10;
  int sample_len = 300;
  double temperature = 0.8;
  int top_k = 40;
  std::string prompt = "And God said";
  std::string save, resume;
  std::int64_t resume_step = 0;  // the checkpoint's step (read before the ranks start)
  int save_every = 0;
  bool generate = false;
  std::string eval_model, eval_tokens;
  std::string loss_csv, loss_svg;
  bool verify = false;
  bool quiet = false;
  std::string on_nonfinite = "stop";  // a NaN or Inf in the loss or a gradient: stop, or skip the step
  int max_consecutive_skips = 5;  // --on-nonfinite skip: a non-finite step after this many skipped in a row stops (0: never)
  std::string log_json;               // one JSON object per step (rank 0), "" for none
  bool heads_given = false;  // whether --heads was on the command line
  std::string plan;          // "auto": the planner picks the layout (gpt/auto_plan.hpp)
  int world_size = 0;        // ranks for --plan auto (0: dp x tp x pp)
  std::string cluster;       // cluster file for --plan auto ("": plan/clusters/this_machine_<backend>.json)
  double plan_tolerance = 0.03;  // --plan auto: within this fraction of the fastest, the plainer layout (plan::choose)
  bool plan_tolerance_given = false;
  std::string device = "cpu";  // --device cuda: train on one CUDA device (gpt/device_training.hpp)
  std::string dtype = "fp32";  // --dtype bf16: mixed precision on the device (fp32 master weights)
  std::string attention = "unfused";  // --attention flash: the device's fused attention kernels
  std::string model;           // --model gpt2-124m: 12 layers, d 768, 12 heads, context 1024 (flags given win)
  std::string inject_fault;    // --inject-fault throw@STEP:RANK: a fault for tests (docs/reliability.md)
  int fault_step = -1, fault_rank = -1;  // --inject-fault parsed (-1: none)

  int world() const { return dp * tp * pp; }
  int num_microbatches() const { return microbatches > 0 ? microbatches : std::max(1, pp * virtual_stages); }
  GPTConfig config() const {
    return {.vocab_size = data::ByteTokenizer::vocab_size, .n_positions = context, .n_layer = layers,
            .n_head = heads, .d_model = d_model, .embd_pdrop = dropout};
  }
  HybridOptions hybrid() const {
    const PipelineScheduleKind kind = schedule == "gpipe"         ? PipelineScheduleKind::gpipe
                                      : schedule == "interleaved" ? PipelineScheduleKind::interleaved_one_f_one_b
                                      : schedule == "zb-h1"       ? PipelineScheduleKind::zero_bubble_h1
                                                                  : PipelineScheduleKind::one_f_one_b;
    return {.schedule = kind, .virtual_stages = virtual_stages, .num_microbatches = num_microbatches(),
            .accumulation_steps = accum, .bucket_size = bucket_bytes(), .recompute = nn::parse_recompute(recompute), .unit_layers = unit_layers()};
  }
  // --bucket-mb in bytes (at least one fp32 element).
  std::size_t bucket_bytes() const {
    return std::max<std::size_t>(sizeof(float), static_cast<std::size_t>(bucket_mb * 1048576.0));
  }
  // AdamW's parameter groups: weight decay on matrices and embeddings, none on biases and
  // LayerNorm weights (nanoGPT's and Megatron's split).
  optim::ParamGroupsOf<float, optim::AdamWOptions> adamw_groups(const ParameterList<float>& params) const {
    return optim::weight_decay_groups(params, optim::AdamWOptions{.lr = lr, .weight_decay = weight_decay,
                                                                  .freeze_variance_after = freeze_variance});
  }
  // SGD's groups (--optimizer sgd): the same split, with --weight-decay as SGD's coupled L2 term.
  optim::ParamGroupsOf<float, optim::SGDOptions> sgd_groups(const ParameterList<float>& params) const {
    return optim::weight_decay_groups(params, optim::SGDOptions{.lr = lr, .momentum = momentum, .weight_decay = weight_decay});
  }
  // Warmup + cosine over schedule_steps (default: --steps); warmup capped at the schedule.
  // Layers per ZeRO-3 unit (HybridOptions::unit_layers) from --zero3-unit: layer 1, stage 0
  // (the whole pipeline stage), N: N layers; 0 without --zero 3.
  int unit_layers() const { return zero == 3 ? zero3_unit_layers() : 0; }
  // Layers per ZeRO-3 unit that --zero3-unit names, whatever --zero is (--plan auto's ZeRO-3 layouts).
  int zero3_unit_layers() const { return zero3_unit == "stage" ? 0 : zero3_unit == "layer" ? 1 : std::stoi(zero3_unit); }
  // The ZeRO stage of --zero (or --zero1). Throws tessera::Error when both are given and differ.
  ZeroStage zero_stage() const {
    TESSERA_EXPECTS(zero < 0 || !zero1 || zero == 1, "train_gpt: --zero1 and --zero ", zero, " disagree");
    return tessera::zero_stage(zero >= 0 ? zero : (zero1 ? 1 : 0));
  }
  optim::WarmupCosine lr_schedule() const {
    const int total = schedule_steps > 0 ? schedule_steps : steps;
    return {.max_lr = lr, .min_lr = min_lr, .warmup_steps = std::min(warmup, total), .total_steps = total};
  }
};


// The command line, with each flag's range.
inline void add_options(CLI::App& app, Args& a) {
  app.add_option("--data", a.data, "text file to train on");
  app.add_option("--dp", a.dp, "data-parallel ranks (with --device cuda: default 1)")->check(CLI::Range(1, 64));
  app.add_option("--tp", a.tp, "tensor-parallel ranks (divides --heads)")->check(CLI::Range(1, 64));
  app.add_option("--pp", a.pp, "pipeline stages (ranks)")->check(CLI::Range(1, 64));
  app.add_option("--schedule", a.schedule, "pipeline schedule (zb-h1: zero-bubble H1, backward split into input and weight gradients)")
      ->check(CLI::IsMember({"gpipe", "1f1b", "interleaved", "zb-h1"}));
  app.add_option("--recompute", a.recompute, "activation recomputation: none, selective (attention's softmax) or full "
                 "(only each stage's input kept)")->check(CLI::IsMember({"none", "selective", "full"}));
  app.add_option("--virtual-stages", a.virtual_stages, "model chunks per pipeline rank (interleaved)")->check(CLI::Range(1, 64));
  app.add_option("--microbatches", a.microbatches, "micro-batches per forward/backward (0: pp x virtual stages)")
      ->check(CLI::Range(0, 4096));
  app.add_option("--accum", a.accum, "gradient accumulation steps per optimizer step")->check(CLI::Range(1, 4096));
  app.add_option("--bucket-mb", a.bucket_mb, "MiB of gradients per dp reduction bucket (PyTorch DDP's bucket_cap_mb, "
                 "Megatron's --ddp-bucket-size; smaller: more, smaller messages, reduced sooner on the device)");
  app.add_flag("--zero1", a.zero1, "shard the optimizer state over dp (ZeRO-1; the same as --zero 1)");
  app.add_option("--zero", a.zero, "ZeRO stage: 0 none, 1 optimizer state, 2 gradients too, 3 parameters too "
                 "(sharded over dp; 3 gathers each unit, --zero3-unit, before its forward and backward)")
      ->check(CLI::Range(0, 3));
  app.add_option("--zero3-unit", a.zero3_unit, "ZeRO-3's unit of gathering (FSDP2's fully_shard granularity): layer "
                 "(each layer gathered before its forward and backward, the next prefetched), stage (the whole "
                 "pipeline stage) or N (groups of N layers)")
      ->check(CLI::IsMember({"layer", "stage"}) | CLI::Range(1, 1 << 20));
  app.add_flag("--memory-report", a.memory_report, "print each rank's live and peak bytes by category at the end");
  app.add_option("--compress", a.compress, "dp gradient compression: bf16, fp16, powersgd:R[,warmup=N] (rank R; N "
                 "steps uncompressed first) or topk:F[,warmup=N][,momentum=M][,sparsity_warmup=S] (fraction F; DGC's momentum "
                 "correction; DGC's rising sparsity over S steps), with error feedback; with --sync-every, the "
                 "compressor of the pseudo-gradients (docs/compression.md)");
  app.add_option("--sync-every", a.sync_every, "DiLoCo / local SGD: replicas step on their own gradients and average "
                 "every H steps through an outer Nesterov SGD (0: synchronous data parallelism)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--outer-lr", a.outer_lr, "DiLoCo's outer learning rate (1 with --outer-momentum 0: parameter averaging)");
  app.add_option("--outer-momentum", a.outer_momentum, "DiLoCo's outer Nesterov momentum, in [0, 1)");
  app.add_option("--freeze-variance", a.freeze_variance, "freeze AdamW's second moment after N steps (1-bit Adam's "
                 "preconditioner, for --compress powersgd/topk: N at most the compressor's warmup=; 0: never)")
      ->check(CLI::Range(0, 1 << 30));
  app.add_flag("--sequence-parallel", a.sequence_parallel, "split activations along the sequence over tp (--context divisible by --tp)");
  app.add_option("--backend", a.backend, "threads (no launcher) or mpi (under mpirun)")->check(CLI::IsMember({"threads", "mpi"}));
  app.add_option("--steps", a.steps, "optimizer steps (in all, counting resumed ones)")->check(CLI::Range(1, 1 << 30));
  app.add_option("--schedule-steps", a.schedule_steps, "length of the learning-rate schedule (0: --steps; on --resume: the checkpoint's)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--layers", a.layers, "transformer blocks")->check(CLI::Range(1, 1 << 30));
  app.add_option("--d-model", a.d_model, "model width")->check(CLI::Range(1, 1 << 30));
  app.add_option("--heads", a.heads, "attention heads")->check(CLI::Range(1, 1 << 30));
  app.add_option("--context", a.context, "sequence length")->check(CLI::Range(1, 65536));
  app.add_option("--batch", a.batch, "global batch in sequences per optimizer step")->check(CLI::Range(1, 1 << 30));
  app.add_option("--lr", a.lr, "peak learning rate");
  app.add_option("--min-lr", a.min_lr, "final learning rate of the cosine decay");
  app.add_option("--warmup", a.warmup, "warmup steps")->check(CLI::Range(0, 1 << 30));
  app.add_option("--clip", a.clip, "clip the global gradient norm to this (0: no clipping)");
  app.add_option("--weight-decay", a.weight_decay, "weight decay, not on biases and LayerNorm weights (AdamW's decoupled; "
                 "with --optimizer sgd, SGD's L2 term added to the gradient)");
  app.add_option("--optimizer", a.optimizer, "adamw, or sgd (momentum SGD, torch.optim.SGD: the optimizer of the "
                 "PowerSGD, Deep Gradient Compression and local SGD papers; checkpoints hold AdamW's state only, so "
                 "not with --save or --resume)")->check(CLI::IsMember({"adamw", "sgd"}));
  app.add_option("--momentum", a.momentum, "with --optimizer sgd: its momentum, in [0, 1) (0 with --compress "
                 "topk:F,momentum=M, whose momentum correction replaces it)");
  app.add_option("--device", a.device, "cpu (the ranks as threads or processes) or cuda (one rank on GPU 0; --dp N --tp M: N x M ranks as threads, a GPU each through NCCL where there are enough, else sharing GPU 0; pp = 1)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--dtype", a.dtype, "with --device cuda: fp32 (TF32 off) or bf16 (mixed precision, fp32 master weights)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--attention", a.attention, "with --device cuda: unfused (batched cuBLASLt products and a softmax "
                 "kernel, keeping the (B, H, T, T) probabilities; the reference) or flash (fused kernels, "
                 "FlashAttention-2's algorithm: one log-sum-exp per row and head; with --dtype bf16 on tensor "
                 "cores where head_dim is a multiple of 8)")
      ->check(CLI::IsMember({"unfused", "flash"}));
  app.add_option("--model", a.model, "a preset: gpt2-124m = --layers 12 --d-model 768 --heads 12 --context 1024 "
                 "(flags given explicitly win)")->check(CLI::IsMember({"gpt2-124m"}));
  app.add_option("--dropout", a.dropout, "dropout probability on the embeddings (GPT-2's embd_pdrop), in [0, 1)");
  app.add_option("--seed", a.seed, "seed of the init, the data order and the sampling")->check(CLI::Validator(
      [](const std::string& v) {
        // Digits only, at most 2^64 - 1 (a larger value would wrap around or saturate silently).
        const bool digits = !v.empty() && v.find_first_not_of("0123456789") == std::string::npos;
        const bool fits = v.size() < 20 || (v.size() == 20 && v <= "18446744073709551615");
        return digits && fits ? std::string() : std::string("must be an integer in [0, 2^64 - 1], got '") + v + "'";
      },
      "SEED >= 0"));
  app.add_option("--val-every", a.val_every, "validation interval in steps (0: never)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--log-every", a.log_every, "progress line interval in steps")->check(CLI::Range(1, 1 << 30));
  app.add_option("--sample-len", a.sample_len, "bytes to sample at the end (0: none)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--prompt", a.prompt, "text the sample starts from");
  app.add_option("--temperature", a.temperature, "sampling temperature (> 0)");
  app.add_option("--top-k", a.top_k, "sampling top-k (0: all)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--save", a.save, "checkpoint directory written at the end (and every --save-every steps)");
  app.add_option("--save-every", a.save_every, "checkpoint interval in steps (0: only at the end)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--resume", a.resume, "checkpoint directory to continue from (saved at any layout)");
  app.add_flag("--generate", a.generate, "load --resume and only sample from it at this layout");
  app.add_option("--eval-model", a.eval_model, "evaluate a Hugging Face GPT-2 .safetensors file (needs --eval-tokens)");
  app.add_option("--eval-tokens", a.eval_tokens, "file of whitespace-separated token ids for --eval-model");
  app.add_option("--loss-csv", a.loss_csv, "write the loss curve as CSV (at the end; a failed write: exit code 1)");
  app.add_option("--loss-svg", a.loss_svg, "write the loss curve as an SVG picture");
  app.add_flag("--verify", a.verify, "also train serially in this process and print the largest loss difference");
  app.add_flag("--quiet", a.quiet, "no per-step lines");
  app.add_option("--on-nonfinite", a.on_nonfinite, "a NaN or Inf in the loss or a gradient: stop (naming the step and "
                 "parameter) or skip the optimizer step")->check(CLI::IsMember({"stop", "skip"}));
  app.add_option("--max-consecutive-skips", a.max_consecutive_skips, "with --on-nonfinite skip: a non-finite step after "
                 "this many skipped in a row stops the run as stop does (diverged training never recovers); 0: no bound")
      ->check(CLI::Range(0, 1 << 30));
  app.add_option("--log-json", a.log_json, "write one JSON object per step to this file (step, loss, lr, tokens/s, grad norm); "
                 "a failed write stops the run with exit code 1, naming the file and step");
  app.add_option("--plan", a.plan, "auto: the planner picks dp, tp, pp, schedule, micro-batches, recomputation and ZeRO stage for --world ranks")
      ->check(CLI::IsMember({"auto"}));
  app.add_option("--world", a.world_size, "ranks for --plan auto (default: dp x tp x pp)")->check(CLI::Range(1, 4096));
  // Not in --help (an empty group): for fault-injection tests, docs/reliability.md.
  app.add_option("--inject-fault", a.inject_fault, "throw@STEP:RANK: world rank RANK throws before step STEP's first "
                 "forward (the other ranks wait in its collectives)")->group("");
  app.add_option("--cluster", a.cluster, "cluster file for --plan auto (default: plan/clusters/this_machine_<backend>.json, "
                 "written by tessera-plan calibrate)");
  app.add_option("--plan-tolerance", a.plan_tolerance, "--plan auto: among layouts predicted within this fraction of the "
                 "fastest, take the one with the fewest optional mechanisms, then synchronizations (0: the fastest)")
      ->check(CLI::Range(0.0, 1.0))
      ->each([&a](const std::string&) { a.plan_tolerance_given = true; });
}

}  // namespace train_gpt
