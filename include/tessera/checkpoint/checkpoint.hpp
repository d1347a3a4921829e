#pragma once
/// @file
/// Checkpoints: sharded safetensors checkpoints saved collectively and atomically, loaded at
/// any (dp, tp, pp) layout, consolidated into one plain file; safetensors reading and writing;
/// loading Hugging Face GPT-2 files. See docs/checkpoints.md.

#include "tessera/checkpoint/checkpoint_info.hpp"
#include "tessera/checkpoint/checkpoint_reader.hpp"
#include "tessera/checkpoint/consolidate.hpp"
#include "tessera/checkpoint/flat_layout.hpp"
#include "tessera/checkpoint/gpt2.hpp"
#include "tessera/checkpoint/load_checkpoint.hpp"
#include "tessera/checkpoint/optimizer_state.hpp"
#include "tessera/checkpoint/safetensors_file.hpp"
#include "tessera/checkpoint/safetensors_writer.hpp"
#include "tessera/checkpoint/save_checkpoint.hpp"
#include "tessera/checkpoint/tensor_shard.hpp"
