"""Logical axis names: sharding is a rules table over these, never code in the layers."""

BATCH = 'batch'
LENGTH = 'length'
EMBED = 'embed'
VOCAB = 'vocab'
HEADS = 'heads'
KV_HEADS = 'kv_heads'
HEAD_DIM = 'head_dim'
MLP = 'mlp'
# Packed kernels (nn.packing) concatenate unlike blocks on one dim: never sharded.
QKV_HEADS = 'qkv_heads'
MLP_PACKED = 'mlp_packed'
LAYERS = 'layers'
NORM = 'norm'
