#pragma once
// train_gpt's dp communication policy (issue 16): --compress reduces every stage's dp gradient
// buckets through a compressor (bf16, powersgd:R, topk:F; parallel/data/compression), and
// --sync-every H runs DiLoCo: the replicas step on their own gradients (LocalGradientHook) and
// meet every H steps (LocalSGD: all-reduce of the pseudo-gradient, outer SGD with Nesterov
// momentum). Both together (--sync-every H --compress C) exchange the pseudo-gradients through
// the compressor C: with H = 1, --outer-lr 1 and --outer-momentum 0, each replica's AdamW step
// (the update direction) is compressed with error feedback and averaged, instead of the
// gradient. It also counts the bytes this rank sends over dp per step.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gpt/args.hpp"
#include "tessera/checkpoint/checkpoint_info.hpp"
#include "tessera/checkpoint/detail/collective.hpp"
#include "tessera/checkpoint/hybrid_state.hpp"
#include "tessera/checkpoint/safetensors_file.hpp"
#include "tessera/checkpoint/safetensors_writer.hpp"
#include "tessera/core/error.hpp"
#include "tessera/parallel/data/compression/local_gradient_hook.hpp"
#include "tessera/parallel/data/compression/make_comm_hook.hpp"
#include "tessera/parallel/data/local_sgd.hpp"
#include "tessera/parallel/hybrid/hybrid.hpp"

namespace train_gpt {

using namespace tessera;

class DpCommunication {
 public:
  // Installs the hooks on `model`'s dp buckets and, with --sync-every, the LocalSGD over
  // `dp` (collective over dp: LocalSGD broadcasts dp rank 0's values).
  // The flag combinations refused here, as usage errors: train_gpt checks them before any rank
  // starts (exit 2, one line), and the constructor again for a layout --plan auto chose.
  static void check_flags(const Args& a) {
    // PowerSGD and top-k compress each rank's bucket as a whole, so a parameter held on several
    // tp ranks (replicated) or pp stages (the tied embedding) would be compressed differently
    // on each and its copies would drift apart (found by tests/compress/train_gpt's resume
    // check). Until the hooks learn which tensors are such copies: refused.
    const bool error_feedback = a.compress.rfind("powersgd", 0) == 0 || a.compress.rfind("topk", 0) == 0;
    TESSERA_EXPECTS(!error_feedback || (a.tp == 1 && a.pp == 1), "train_gpt: --compress ", a.compress, " at tp ", a.tp,
                    " x pp ", a.pp, ": PowerSGD and top-k need tp 1 and pp 1 (a tp-replicated or pp-tied parameter's "
                    "copies would be compressed differently and drift apart); bf16 and fp16 work at any layout");
    // top-k's momentum correction (DGC) is the optimizer's momentum moved into the compressor:
    // the reduced bucket is a sum of velocities, which only SGD without momentum applies as is.
    if (const auto topk = top_k(a)) {
      TESSERA_EXPECTS(topk->momentum() == 0 || (a.optimizer == "sgd" && a.momentum == 0 && a.sync_every == 0),
                      "train_gpt: --compress ", a.compress, " is Deep Gradient Compression's momentum correction, which "
                      "replaces the optimizer's momentum: use it with --optimizer sgd --momentum 0 and without "
                      "--sync-every (got --optimizer ", a.optimizer, a.optimizer == "sgd" ? detail::str(" --momentum ", a.momentum) : "",
                      a.sync_every > 0 ? detail::str(" --sync-every ", a.sync_every) : "", ")");
      // A bucket reduced every micro-batch would take U = m U + G once per micro-batch: m^accum
      // per step for most units and m for the tied one.
      TESSERA_EXPECTS(topk->momentum() == 0 || !micro_batch_reductions(a), "train_gpt: --compress ", a.compress,
                      " with --zero 3 --zero3-unit ", a.zero3_unit, " --accum ", a.accum, ": ZeRO-3's per-layer units "
                      "reduce every micro-batch, so DGC's velocity would decay ", a.accum, " times per step in most "
                      "units and once in the tied-embedding unit; use --zero3-unit stage, --zero 2 or --accum 1");
      // SGD adds its weight decay after the compressor, so it would bypass the velocity.
      TESSERA_EXPECTS(topk->momentum() == 0 || a.weight_decay == 0, "train_gpt: --weight-decay ", a.weight_decay,
                      " with --compress ", a.compress, ": SGD adds the decay after the compressor, so it would bypass "
                      "the momentum correction's velocity; drop --weight-decay (or use --momentum with another "
                      "compressor)");
    }
    // --freeze-variance N freezes AdamW's v after N steps so that the optimizer is linear in
    // the compressed gradient (1-bit Adam); v must come from uncompressed gradients only, so a
    // compressor on the gradient needs at least N dense warm-up reductions first.
    if (a.freeze_variance > 0 && error_feedback && a.sync_every == 0) {
      // Reductions per step: one on the accumulated gradient, one per micro-batch for ZeRO-3's
      // per-layer units (the units without the tied embedding reduce as their backward ends;
      // ZeRO-2 and --zero3-unit stage reduce whole stages once per step).
      const std::int64_t per_step = micro_batch_reductions(a) ? a.accum : 1, need = a.freeze_variance * per_step;
      const std::int64_t w = make_comm_hook<float>(a.compress)->warmup_steps();
      TESSERA_EXPECTS(w >= need, "train_gpt: --freeze-variance ", a.freeze_variance, " with --compress ", a.compress,
                      ": AdamW's second moment would take ", need - w, " compressed reduction(s) before it freezes; "
                      "give the compressor warmup=", need, " or more (its uncompressed reductions, ", per_step,
                      per_step > 1 ? " per step in ZeRO-3's per-layer units here; the tied-embedding unit's one per step"
                                   : " per step here", ")");
    }
  }

  // Whether some gradient buckets are reduced (and so compressed) once per micro-batch rather
  // than once per step: ZeRO-3's per-layer units at --accum > 1 (DataParallelStage reduces a
  // unit without the tied embedding as its backward ends; the tied unit once per step).
  static bool micro_batch_reductions(const Args& a) { return a.zero == 3 && a.unit_layers() > 0 && a.accum > 1; }

  // --compress's TopKHook (nullptr for another compressor or none), for its options.
  static std::shared_ptr<const TopKHook<float>> top_k(const Args& a) {
    if (a.compress.rfind("topk", 0) != 0) return nullptr;
    return std::dynamic_pointer_cast<const TopKHook<float>>(make_comm_hook<float>(a.compress));
  }

  DpCommunication(Hybrid<float>& model, Comm dp, const Args& a) : dp_size_(dp.size()) {
    check_flags(a);
    for (GradBuckets<float>* set : model.buckets()) {
      std::int64_t n = 0;
      for (const auto& b : set->buckets()) n += b.numel;
      plain_elements_ += n;
      sets_.push_back(set);
    }
    zero3_ = a.zero == 3;
    if (a.sync_every > 0) {
      for (GradBuckets<float>* set : model.buckets()) {
        hooks_.push_back(std::make_shared<LocalGradientHook<float>>());
        set->set_comm_hook(hooks_.back());
      }
      local_.emplace(model.parameters(), dp, LocalSGDOptions{.sync_every = a.sync_every, .outer_lr = a.outer_lr,
                                                             .outer_momentum = a.outer_momentum, .nesterov = true});
      for (const Parameter<float>* p : distinct(model.parameters())) sync_elements_ += p->value.numel();
      if (!a.compress.empty()) {
        sync_hook_ = make_comm_hook<float>(a.compress);
        local_->set_comm_hook(sync_hook_);
      }
    } else if (!a.compress.empty()) {
      for (GradBuckets<float>* set : model.buckets()) {
        hooks_.push_back(make_comm_hook<float>(a.compress));
        set->set_comm_hook(hooks_.back());
      }
    }
  }

  // After every step (taken or skipped): counts it; with --sync-every, LocalSGD's count and
  // its synchronization every H steps. Collective over dp on a synchronization step.
  void after_step() {
    ++steps_;
    if (local_ && local_->step() && !sync_hook_) bytes_ += ring_all_reduce_bytes(sync_elements_);
  }

  // The gradient norm to clip by: `reduced_norm` (the norm of the reduced gradient, the same
  // on every replica) for synchronous data parallelism; with --sync-every, this replica's own
  // gradient's norm (replica_grad_norm: the replicas' gradients differ and their AdamW steps
  // are local; Hybrid::gradients() counts dp rank 0's pieces only, which scaled every replica
  // by replica 0's norm). Collective over the world with --sync-every (one all-reduce of dp
  // doubles), local otherwise.
  double clip_norm(const Hybrid<float>& model, Mesh& mesh, double reduced_norm) const {
    if (!local_) return reduced_norm;
    // Replica 0's counting rule (Hybrid: a later stage's tied copy not counted, a
    // tp-replicated parameter on tp rank 0 only), applied on every replica.
    optim::Gradients<float> g{{}, mesh.world()};
    for (const Parameter<float>& p : model.parameters())
      g.pieces.push_back({p.grad, !model.tied_copies().count(&p) && (p.layout.is_shard() || mesh.coord().tp == 0)});
    return replica_grad_norm(g, mesh.coord().dp, dp_size_);
  }

  // Bytes this rank sent over dp per step, on average over the steps since the last call
  // (ring-model volumes, as CommHook::bytes_sent; without a hook: the fp32 all-reduce of
  // every bucket once per step; ZeRO-3: its reduce-scatter plus the parameter all-gathers).
  // 0 before any step.
  double take_bytes_per_step() {
    std::int64_t hooked = 0;
    for (const auto& h : hooks_) hooked += h->bytes_sent();
    if (sync_hook_) hooked += sync_hook_->bytes_sent();
    // ZeRO-3: the gradients' reduce-scatter (half an all-reduce) and every parameter
    // all-gather the buckets issued (before each forward and backward of a unit), each sending
    // (dp - 1) / dp of the gathered buffer.
    std::int64_t gathered = 0;
    for (const GradBuckets<float>* set : sets_) gathered += set->gathered_elements();
    std::int64_t b = bytes_ + (hooked - hooks_seen_);
    if (hooks_.empty()) b += steps_ * ring_all_reduce_bytes(plain_elements_) / (zero3_ ? 2 : 1);
    if (zero3_) b += ring_all_reduce_bytes(gathered - gathered_seen_) / 2;
    gathered_seen_ = gathered;
    total_bytes_ += b;
    total_steps_ += steps_;
    const double per_step = steps_ > 0 ? static_cast<double>(b) / static_cast<double>(steps_) : 0.0;
    hooks_seen_ = hooked;
    bytes_ = 0;
    steps_ = 0;
    return per_step;
  }
  // Bytes this rank sent over dp per step over every step counted by take_bytes_per_step so
  // far (the whole run when called after the last progress line), and that step count.
  double total_bytes_per_step() const {
    return total_steps_ > 0 ? static_cast<double>(total_bytes_) / static_cast<double>(total_steps_) : 0.0;
  }
  std::int64_t total_steps() const { return total_steps_; }

  // This rank's gradient buckets' element counts, over its stages in order (a compressor's state
  // is per bucket: a resume takes it only into the same buckets).
  template <class Model>
  static std::vector<std::int64_t> bucket_layout(Model& model) {
    std::vector<std::int64_t> out;
    for (auto* b : model.buckets())
      for (const auto& bucket : b->buckets()) out.push_back(bucket.numel);
    return out;
  }

  // The file beside a checkpoint's shards holding world rank `rank`'s dp state.
  static std::filesystem::path state_file(const std::filesystem::path& dir, int rank) {
    char name[64];
    std::snprintf(name, sizeof name, "dp-state-rank%05d.safetensors", rank);
    return dir / name;
  }

  // Saves this rank's dp state into the checkpoint `dir` just written (after
  // save_hybrid_checkpoint): the compressors' residuals, warm starts and warm-up counts; with
  // --sync-every, LocalSGD's state (this replica's weights, the anchor, the outer momentum, the
  // counters) and this replica's AdamW moments (they differ between replicas). Tagged with the
  // checkpoint's id, layout and policy, so a resume takes it only into the same run shape.
  // Nothing for stateless policies (fp32, bf16). Collective over the world: every rank throws
  // if one failed to write.
  template <class Model, class Opt>
  void save_state(const std::filesystem::path& dir, Comm& world, const Mesh& mesh, Model& model, Opt& opt,
                  const Args& a, int step) {
    if (!stateful()) return;
    std::exception_ptr err;
    try {
      const DpRankState<float> st = collect(model, opt);
      checkpoint::SafetensorsWriter w;
      for (const auto& [k, v] : st.tensors)
        if (!v.empty()) w.add(k, Tensor<float>::from(Shape{static_cast<std::int64_t>(v.size())}, std::span<const float>(v)));
      nlohmann::json meta = {{"checkpoint_id", checkpoint_id(dir)}, {"step", step}, {"dp", a.dp}, {"pp", a.pp}, {"tp", a.tp},
                             {"coord", {mesh.coord().dp, mesh.coord().pp, mesh.coord().tp}}, {"policy", describe(a)},
                             {"counters", st.counters}, {"buckets", bucket_layout(model)}};
      w.set_metadata("tessera.dp_state", meta.dump());
      w.write(state_file(dir, world.rank()));
    } catch (...) {
      err = std::current_exception();
    }
    // Every rank throws the same Error, naming the lowest failing rank and its cause.
    checkpoint::detail::agree(world, err, detail::str("train_gpt: saving the dp state (", describe(a), ") into ", dir),
                              checkpoint::detail::Blame::shared);
  }

  // Loads this rank's dp state from the checkpoint `dir` just loaded (after
  // load_hybrid_checkpoint), when every rank's file is there and was saved by this
  // checkpoint at the same dp x pp x tp with the same policy; then the run continues bitwise
  // as the uninterrupted one. Otherwise (another layout or policy, an older checkpoint) the
  // state restarts: rank 0 prints a note saying why, and DiLoCo takes the loaded weights as
  // its anchor. Collective over the world (and dp). Returns whether it was loaded.
  template <class Model, class Opt>
  bool load_state(const std::filesystem::path& dir, Comm& world, const Mesh& mesh, Model& model, Opt& opt,
                  const Args& a, int step, bool print) {
    if (!stateful()) {
      // Saved with a compressor or DiLoCo, resumed without: its state goes unused; say so.
      if (std::error_code ec; print && std::filesystem::exists(state_file(dir, 0), ec)) {
        std::string policy;
        try {
          const checkpoint::SafetensorsFile f(state_file(dir, 0));
          const nlohmann::json meta = nlohmann::json::parse(f.metadata().at("tessera.dp_state"));
          if (meta.at("checkpoint_id").get<std::string>() == checkpoint_id(dir)) policy = meta.at("policy").get<std::string>();
        } catch (const std::exception&) {
          policy = "a compressor or DiLoCo (its file is unreadable)";
        }
        if (!policy.empty())
          std::printf("train_gpt: note: the checkpoint holds the dp state of %s, which this run (%s) does not use: "
                      "this resume does not continue the interrupted run exactly\n", policy.c_str(), describe(a).c_str());
      }
      return false;
    }
    std::string why;
    std::optional<checkpoint::SafetensorsFile> file;
    try {
      const std::filesystem::path path = state_file(dir, world.rank());
      if (!std::filesystem::exists(path)) {
        why = "the checkpoint has no dp state for rank " + std::to_string(world.rank());
      } else {
        file.emplace(path);
        const auto it = file->metadata().find("tessera.dp_state");
        TESSERA_EXPECTS(it != file->metadata().end(), path, " has no tessera.dp_state metadata");
        const nlohmann::json meta = nlohmann::json::parse(it->second);
        const std::string policy = meta.at("policy").get<std::string>();
        if (meta.at("checkpoint_id").get<std::string>() != checkpoint_id(dir))
          why = "rank " + std::to_string(world.rank()) + "'s dp state belongs to another checkpoint";
        else if (meta.at("dp").get<int>() != a.dp || meta.at("pp").get<int>() != a.pp || meta.at("tp").get<int>() != a.tp)
          why = detail::str("it was saved at dp=", meta.at("dp").get<int>(), " pp=", meta.at("pp").get<int>(),
                            " tp=", meta.at("tp").get<int>(), " (dp state is per dp rank)");
        else if (policy != describe(a))
          why = "it was saved with " + policy;
        else if (!local_ && meta.contains("buckets") && meta.at("buckets").get<std::vector<std::int64_t>>() != bucket_layout(model))
          why = detail::str("its gradient buckets differ (", meta.at("buckets").size(), " saved, ",
                            bucket_layout(model).size(), " now: --bucket-mb, --zero or --zero3-unit changed), and a "
                            "compressor's state is per bucket");
      }
    } catch (const std::exception& e) {
      why = e.what();
    }
    // Why each rank cannot take its state ("" where it can): the note names the first.
    const std::vector<std::string> whys = checkpoint::detail::all_gather_strings(world, why);
    int missing = 0;
    for (std::size_t r = 0; r < whys.size(); ++r)
      if (!whys[r].empty() && missing++ == 0 && why.empty()) why = detail::str("rank ", r, ": ", whys[r]);
    if (missing == 0) {
      std::exception_ptr err;
      try {
        DpRankState<float> st;
        for (const checkpoint::TensorInfo& t : file->tensors()) {
          const Tensor<float> v = file->read<float>(t.name);
          st.tensors[t.name] = std::vector<float>(v.data(), v.data() + v.numel());
        }
        const nlohmann::json meta = nlohmann::json::parse(file->metadata().at("tessera.dp_state"));
        st.counters = meta.at("counters").get<std::map<std::string, std::int64_t>>();
        apply(st, model, opt);
      } catch (...) {
        err = std::current_exception();
      }
      // Every rank throws the same Error, naming the lowest failing rank, its file and cause.
      checkpoint::detail::agree(world, err,
                                detail::str("train_gpt: loading the dp state from ", dir),
                                checkpoint::detail::Blame::shared);
      if (print) std::printf("resumed the dp state (%s) of every rank\n", describe(a).c_str());
      return true;
    }
    if (local_) local_->restart(step);
    if (print)
      std::printf("train_gpt: note: the dp state (%s) restarts (%s%s): this resume does not continue the interrupted run exactly\n",
                  restarting_state().c_str(),
                  why.c_str(),
                  missing > 1 ? detail::str("; ", missing, " ranks").c_str() : "");
    (void)mesh;
    return false;
  }

  // What a restart loses, for the resume note: DiLoCo's outer momentum and anchor; a
  // compressor's residuals, DGC's velocities, and its warm-ups, which start over (dense
  // reductions, then the sparsity schedule's stages; under DiLoCo they count synchronizations).
  std::string restarting_state() const {
    const std::shared_ptr<CommHook<float>> hook = local_ ? sync_hook_ : hooks_.empty() ? nullptr : hooks_.front();
    std::string what = local_ ? "the outer momentum; the anchor is the loaded weights" : "";
    if (!hook) return local_ ? what : "error-feedback residuals";
    const char* unit = local_ ? "synchronizations" : "reductions";
    what += local_ ? "; the pseudo-gradient compressor's error-feedback residuals" : "error-feedback residuals";
    const auto topk = std::dynamic_pointer_cast<const TopKHook<float>>(hook);
    if (topk && topk->momentum() > 0) what += " and DGC's velocities";
    if (hook->warmup_steps() > 0) what += detail::str("; its ", hook->warmup_steps(), " dense warm-up ", unit, " run again");
    if (topk && topk->sparsity_warmup_steps() > 0)
      what += detail::str("; its sparsity warm-up starts again from 1/4 of the entries over ",
                          topk->sparsity_warmup_steps(), " ", unit);
    return what;
  }

  // "fp32 all-reduce", the compressor's name, or "DiLoCo H=..".
  std::string describe(const Args& a) const {
    if (local_)
      return "DiLoCo: sync every " + std::to_string(a.sync_every) + " steps, outer lr " + std::to_string(a.outer_lr) +
             " momentum " + std::to_string(a.outer_momentum) +
             (sync_hook_ ? ", pseudo-gradients through " + sync_hook_->name() : std::string());
    return hooks_.empty() ? std::string("fp32 all-reduce") : "compression " + hooks_.front()->name();
  }

 private:
  std::int64_t ring_all_reduce_bytes(std::int64_t elements) const {
    return static_cast<std::int64_t>(2.0 * (dp_size_ - 1) / dp_size_ * static_cast<double>(elements) * sizeof(float));
  }
  static std::vector<const Parameter<float>*> distinct(const ParameterList<float>& params) {
    std::vector<const Parameter<float>*> out;
    std::vector<const float*> seen;
    for (const Parameter<float>& p : params) {
      if (p.value.numel() == 0 || std::find(seen.begin(), seen.end(), p.value.data()) != seen.end()) continue;
      seen.push_back(p.value.data());
      out.push_back(&p);
    }
    return out;
  }

  // Whether the policy keeps state across steps that a checkpoint must hold.
  bool stateful() const {
    if (local_) return true;
    for (const auto& h : hooks_)
      if (h->name().rfind("powersgd", 0) == 0 || h->name().rfind("topk", 0) == 0) return true;
    return false;
  }
  // The checkpoint's id (index.json), which tags the dp state saved with it.
  static std::string checkpoint_id(const std::filesystem::path& dir) {
    std::ifstream in(dir / checkpoint::index_file_name);
    TESSERA_EXPECTS(in.good(), "train_gpt: cannot read ", dir / checkpoint::index_file_name);
    return nlohmann::json::parse(in).at("id").get<std::string>();
  }
  // This rank's state: "hook<j>." per bucket set's hook; "local." LocalSGD's; "adamw.<name>"
  // this replica's AdamW moments (DiLoCo only).
  template <class Model, class Opt>
  DpRankState<float> collect(Model& model, Opt& opt) const {
    DpRankState<float> st;
    for (std::size_t j = 0; j < hooks_.size(); ++j) st.add("hook" + std::to_string(j) + ".", hooks_[j]->state());
    if (local_) {
      st.add("local.", local_->state());
      for (const auto& t : checkpoint::hybrid_adamw_state(model, opt).tensors) {
        const Tensor<float> v = t.value.contiguous();
        st.tensors["adamw." + t.name] = std::vector<float>(v.data(), v.data() + v.numel());
      }
    }
    return st;
  }
  template <class Model, class Opt>
  void apply(const DpRankState<float>& st, Model& model, Opt& opt) {
    for (std::size_t j = 0; j < hooks_.size(); ++j) hooks_[j]->load_state(st.take_prefix("hook" + std::to_string(j) + "."));
    if (local_) {
      local_->load_state(st.take_prefix("local."));
      for (auto& t : checkpoint::hybrid_adamw_state(model, opt).tensors) {
        auto it = st.tensors.find("adamw." + t.name);
        TESSERA_EXPECTS(it != st.tensors.end() && static_cast<std::int64_t>(it->second.size()) == t.value.numel(),
                        "train_gpt: the dp state lacks this replica's AdamW tensor '", t.name, "' of ", t.value.numel(),
                        " elements");
        t.value.copy_from(Tensor<float>::from(t.value.shape(), std::span<const float>(it->second)));
      }
    }
  }

  int dp_size_;
  std::vector<std::shared_ptr<CommHook<float>>> hooks_;
  std::shared_ptr<CommHook<float>> sync_hook_;  // --sync-every with --compress: LocalSGD's exchange
  std::optional<LocalSGD<float>> local_;
  std::int64_t plain_elements_ = 0, sync_elements_ = 0, bytes_ = 0, hooks_seen_ = 0, steps_ = 0;
  std::int64_t total_bytes_ = 0, total_steps_ = 0;
  std::vector<const GradBuckets<float>*> sets_;  // every stage's dp buckets on this rank
  bool zero3_ = false;
  std::int64_t gathered_seen_ = 0;  // ZeRO-3: gathered_elements counted so far
};

}  // namespace train_gpt
