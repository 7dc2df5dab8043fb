using System;
using System.Collections.Generic;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// TorchSharp's <c>nn.Embedding</c> (PEFT's <c>lora.Embedding</c>): a <see cref="LoraEmbeddingLayer"/> adapter with
    /// <c>lora_embedding_A</c> (r, num_embeddings) and <c>lora_embedding_B</c> (embedding_dim, r), parameters (PEFT's
    /// <c>ParameterDict</c>s) saved as <c>&lt;path&gt;.lora_embedding_A</c> / <c>_B</c>; wrapped by a
    /// <see cref="LoraEmbeddingWrapper"/> or hooked. Not a linear layer for <c>all-linear</c>; DoRA is refused.
    /// </summary>
    internal sealed class EmbeddingLayerType : ILoraLayerType
    {
        private static readonly AdapterAttribute[] EmbeddingAttributes = { new("lora_embedding_A", true), new("lora_embedding_B", true) };

        private static readonly FilePart[] EmbeddingParts = { new("lora_embedding_A", ".lora_embedding_A"), new("lora_embedding_B", ".lora_embedding_B") };

        public string Name => "nn.Embedding";

        public bool IsLinear => false;

        public bool Matches(nn.Module module) => module is Embedding;

        public Parameter Weight(nn.Module module) => ((Embedding)module).weight!;

        public Parameter? Bias(nn.Module module) => null;

        public string? Refusal(string path, nn.Module module, LoraConfig config, bool adaptedAlready)
        {
            var weight = Weight(module);
            if (weight.dim() != 2)
                return $"{path} has a weight of shape [{string.Join(", ", weight.shape)}], not 2-D";
            return config.use_dora ? $"{path} is an nn.Embedding, and DoRA on embeddings is not implemented (use_dora)" : null;
        }

        public IReadOnlyList<AdapterAttribute> Attributes => EmbeddingAttributes;

        public IReadOnlyList<FilePart> FileParts => EmbeddingParts;

        public long[] PartShape(nn.Module module, string part, int rank)
        {
            var weight = Weight(module);
            return part switch
            {
                "lora_embedding_A" => new[] { (long)rank, weight.size(0) },
                "lora_embedding_B" => new[] { weight.size(1), (long)rank },
                _ => throw new ArgumentException($"{Name} adapters have no part {part}.", nameof(part)),
            };
        }

        public IAdapter Create(nn.Module module, int rank, double alpha, LoraConfig config, bool draw)
        {
            var weight = Weight(module);
            return new LoraEmbeddingLayer(weight.size(0), weight.size(1), rank, alpha, config.use_rslora, weight.dtype, weight.device,
                                          draw ? config.init_lora_weights : "true", draw);
        }

        public Action? AttachInPlace(nn.Module module, AdaptedLayer layer) => null;

        public Type? WrapperType => typeof(LoraEmbeddingWrapper);

        public nn.Module Wrap(nn.Module module, AdaptedLayer layer) => new LoraEmbeddingWrapper((Embedding)module, layer);

        /// <summary>An embedding's update is (B A)ᵀ · scaling: B A is its transpose.</summary>
        public Tensor DeltaMatrix(Tensor delta) => delta.t();

        public bool Stacks => false;
    }
}
