// LoraLinear: a template for your own LoRA-style layer — a frozen linear layer with a low-rank adapter, built from
// Parameters, with loralib's state_dict keys (weight, bias, lora_A, lora_B). Copy this file into a project that
// references TorchLinear.Lora: the arithmetic (scaling, the update, merge and unmerge) is the package's LoraLayer,
// written once; this file only decides what the layer holds and how it saves.
//
//   y = x Wᵀ + b + (dropout(x) Aᵀ Bᵀ) · scaling,   scaling = lora_alpha / r   (or lora_alpha / √r with rsLoRA)
// with W (out, in) and b frozen, A (r, in) and B (out, r) trainable, A ~ kaiming_uniform(a = √5), B = 0 (loralib.Linear).
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using TorchLinear.Lora;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace TorchLinear.Samples
{
    /// <summary>
    /// A linear layer with a low-rank adapter: <c>y = x Wᵀ + b + (dropout(x) Aᵀ Bᵀ) · scaling</c>. <c>weight</c> and
    /// <c>bias</c> are frozen; only <c>lora_A</c> and <c>lora_B</c> train. A fresh adapter (B = 0) computes what the
    /// wrapped layer computes; <see cref="merge"/> folds <c>B A · scaling</c> into the weight and <see cref="unmerge"/>
    /// restores it bit for bit. A <see cref="GuardedModule"/>: after Dispose every use throws ObjectDisposedException.
    /// <code>
    /// using var lora = LoraLinear.FromLinear(pretrained, r: 8, lora_alpha: 16);
    /// var optimizer = torch.optim.Adam(lora.parameters().Where(p => p.requires_grad));
    /// </code>
    /// </summary>
    public sealed class LoraLinear : GuardedModule
    {
        [ComponentName(Name = "weight")]
        private Parameter _weight;

        [ComponentName(Name = "bias")]
        private Parameter? _bias;

        // The adapter and its arithmetic. Its lora_A and lora_B weights are registered here, under loralib's names.
        private readonly LoraLayer _lora;

        /// <summary>Creates a freshly initialised layer (as <c>nn.Linear</c>), then a fresh adapter.</summary>
        /// <param name="in_features">Size of each input sample.</param>
        /// <param name="out_features">Size of each output sample.</param>
        /// <param name="r">Rank of the adapter, 1 or more.</param>
        /// <param name="lora_alpha">Scale numerator, a finite number: scaling = lora_alpha / r (or / √r with rsLoRA).</param>
        /// <param name="lora_dropout">Dropout probability on the adapter's input, in [0, 1); applied in training mode only.</param>
        /// <param name="bias">Whether the layer has a (frozen) bias.</param>
        /// <param name="use_rslora">Rank-stabilised LoRA: scaling = lora_alpha / √r.</param>
        /// <param name="device">Device of the parameters.</param>
        /// <param name="dtype">Floating-point dtype of the parameters.</param>
        public LoraLinear(long in_features, long out_features, int r, double lora_alpha = 1.0, double lora_dropout = 0.0,
                          bool bias = true, bool use_rslora = false, Device? device = null, ScalarType? dtype = null)
            : this(BaseLayer(in_features, out_features, bias, device, dtype, r, lora_alpha, lora_dropout), r, lora_alpha, lora_dropout, use_rslora, ownsSource: true)
        {
        }

        private LoraLinear(CustomLinear source, int r, double lora_alpha, double lora_dropout, bool use_rslora, bool ownsSource)
            : base(nameof(LoraLinear))
        {
            in_features = source.in_features;
            out_features = source.out_features;
            using (no_grad())
            {
                // Copies, never aliases: training the adapter must not touch the layer it came from. Registered in
                // loralib's order, so state_dict() lists weight, bias, lora_A, lora_B.
                _weight = Register("weight", new Parameter(source.weight.detach().clone(), requires_grad: false));
                if (source.bias is not null)
                    _bias = Register("bias", new Parameter(source.bias.detach().clone(), requires_grad: false));
            }
            _lora = new LoraLayer(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, source.weight.dtype, source.weight.device);
            Register("lora_A", _lora.lora_A.weight);
            Register("lora_B", _lora.lora_B.weight);
            if (ownsSource)
                source.Dispose();
        }

        /// <summary>Wraps a copy of a pretrained <see cref="CustomLinear"/>; the source is left untouched.</summary>
        public static LoraLinear FromLinear(CustomLinear pretrained, int r, double lora_alpha = 1.0, double lora_dropout = 0.0, bool use_rslora = false)
        {
            ArgumentNullException.ThrowIfNull(pretrained);
            CheckArguments(pretrained.in_features, pretrained.out_features, r, lora_alpha, lora_dropout, pretrained.weight.dtype);
            return new LoraLinear(pretrained, r, lora_alpha, lora_dropout, use_rslora, ownsSource: false);
        }

        /// <summary>Wraps a copy of a pretrained TorchSharp <c>nn.Linear</c>; the source is left untouched.</summary>
        /// <exception cref="ArgumentException">The pretrained weight is not 2-D.</exception>
        public static LoraLinear FromLinear(Linear pretrained, int r, double lora_alpha = 1.0, double lora_dropout = 0.0, bool use_rslora = false)
        {
            ArgumentNullException.ThrowIfNull(pretrained);
            if (pretrained.weight.dim() != 2)
                throw new ArgumentException($"LoraLinear.FromLinear: the pretrained weight must be 2-D (out_features, in_features), but has shape [{string.Join(", ", pretrained.weight.shape)}].", nameof(pretrained));
            CheckArguments(pretrained.weight.size(1), pretrained.weight.size(0), r, lora_alpha, lora_dropout, pretrained.weight.dtype);
            // A temporary CustomLinear over copies of nn.Linear's tensors; the constructor copies again and disposes it.
            var copy = new CustomLinear(new Parameter(pretrained.weight.detach().clone()),
                                        pretrained.bias is null ? null : new Parameter(pretrained.bias.detach().clone()));
            return new LoraLinear(copy, r, lora_alpha, lora_dropout, use_rslora, ownsSource: true);
        }

        /// <summary>Size of each input sample.</summary>
        public long in_features { get; }

        /// <summary>Size of each output sample.</summary>
        public long out_features { get; }

        /// <summary>Rank of the adapter.</summary>
        public int r => _lora.r;

        /// <summary>The scale numerator.</summary>
        public double lora_alpha => _lora.lora_alpha;

        /// <summary>Dropout probability on the adapter's input (training mode only).</summary>
        public double lora_dropout => _lora.lora_dropout;

        /// <summary>Whether the scaling is lora_alpha / √r.</summary>
        public bool use_rslora => _lora.use_rslora;

        /// <summary>lora_alpha / r, or lora_alpha / √r with rsLoRA.</summary>
        public double scaling => _lora.scaling;

        /// <summary>True while <c>B A · scaling</c> is folded into <see cref="weight"/>.</summary>
        public bool merged => _lora.merged;

        // The private setters are for Module.to(dtype/device), which replaces each parameter through the property of the
        // same name: the old tensor is freed and the new one registered under the same key.

        /// <summary>The frozen weight, (out_features, in_features); while merged, <c>W + Δ</c>.</summary>
        public Parameter weight { get { ThrowIfDisposed(); return _weight; } private set => _weight = Register("weight", value, _weight); }

        /// <summary>The frozen bias, (out_features), or null.</summary>
        public Parameter? bias { get { ThrowIfDisposed(); return _bias; } private set => _bias = Register("bias", value!, _bias); }

        /// <summary>The adapter's down-projection, (r, in_features).</summary>
        public Parameter lora_A
        {
            get { ThrowIfDisposed(); return _lora.lora_A.weight; }
            private set => Register("lora_A", _lora.lora_A.weight = value);
        }

        /// <summary>The adapter's up-projection, (out_features, r).</summary>
        public Parameter lora_B
        {
            get { ThrowIfDisposed(); return _lora.lora_B.weight; }
            private set => Register("lora_B", _lora.lora_B.weight = value);
        }

        /// <summary>Re-initialises the adapter as loralib does: A ~ kaiming_uniform(a = √5), B = 0.</summary>
        public void reset_lora_parameters()
        {
            ThrowIfDisposed();
            _lora.reset_lora_parameters();
        }

        /// <summary>The weight update the adapter stands for: <c>(B A) · scaling</c>, shape (out_features, in_features).</summary>
        public Tensor delta_weight()
        {
            ThrowIfDisposed();
            return _lora.get_delta_weight();
        }

        /// <summary>
        /// Folds the adapter into the weight (<c>W += B A · scaling</c>), so that forward is a single linear; a second call
        /// does nothing. While merged, the adapter gets no gradients: merge for inference. The weight before merging is
        /// kept, so that <see cref="unmerge"/> restores it bit for bit and <see cref="state_dict"/> saves it.
        /// </summary>
        public void merge()
        {
            ThrowIfDisposed();
            _lora.merge(_weight);
        }

        /// <summary>Takes the adapter out of the weight again, restoring it bit for bit. Does nothing when not merged.</summary>
        public void unmerge()
        {
            ThrowIfDisposed();
            _lora.unmerge(_weight);
        }

        /// <summary>
        /// Unmerged: <c>linear(x, W, b) + (dropout(x) Aᵀ Bᵀ) · scaling</c>; merged: <c>linear(x, W + Δ, b)</c>.
        /// </summary>
        /// <exception cref="ArgumentException">The input does not fit the layer; the message says how.</exception>
        public override Tensor forward(Tensor input)
        {
            ThrowIfDisposed();
            Tensor output;
            try
            {
                // LinearFunctional.linear checks the input before any matmul runs (TorchSharp's matmul aborts the process
                // on bad input), so the adapter's products always get a valid x.
                output = LinearFunctional.linear(input, _weight, _bias);
            }
            catch (ArgumentException error)
            {
                throw new ArgumentException($"{this}: {error.Message}", error);
            }
            try
            {
                return _lora.AddTo(output, input, training);
            }
            catch
            {
                output.Dispose();
                throw;
            }
        }

        /// <summary>
        /// loralib's keys. A merged layer saves its weight as it was before merging, W, not W + Δ: every state_dict
        /// describes an unmerged layer, so loading it into a fresh layer (or into a merged one) applies the update once.
        /// </summary>
        public override Dictionary<string, Tensor> state_dict(Dictionary<string, Tensor>? destination = null, string? prefix = null)
        {
            ThrowIfDisposed();
            var result = base.state_dict(destination, prefix);
            if (_lora.WeightBeforeMerge is { } unmerged)
                result[string.IsNullOrEmpty(prefix) ? "weight" : $"{prefix}.weight"] = unmerged;
            return result;
        }

        /// <summary>
        /// Copies the tensors of <paramref name="source"/> after checking every key, shape and dtype (TorchSharp's own
        /// <c>load_state_dict</c> would let <c>copy_</c> broadcast an r = 1 adapter into an r = 4 layer). A refusal names
        /// every problem and changes nothing. Into a merged layer, the (unmerged) state is loaded and merged again.
        /// </summary>
        /// <exception cref="InvalidOperationException">A key is missing or unexpected (when strict), or a shape or dtype differs.</exception>
        public override (IList<string> missing_keys, IList<string> unexpected_keyes) load_state_dict(
            Dictionary<string, Tensor> source, bool strict = true, IList<string>? skip = null)
        {
            ThrowIfDisposed();
            ArgumentNullException.ThrowIfNull(source);
            var problems = StateDicts.Problems(this, source, strict, skip);
            if (problems.Count > 0)
                throw new InvalidOperationException($"{this}: refused to load the state_dict, nothing was changed: {string.Join("; ", problems)}.");
            bool wasMerged = merged;
            unmerge();
            var result = base.load_state_dict(source, strict, skip);
            if (wasMerged)
                merge();
            return result;
        }

        /// <inheritdoc />
        protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
        {
            // Converted unmerged, then merged again: the kept weight converts with the weight.
            bool wasMerged = merged;
            unmerge();
            base._toEpilog(dtype, device, non_blocking);
            if (wasMerged)
                merge();
        }

        /// <summary>Registers nothing more: the constructor registered the four parameters.</summary>
        protected override void RegisterComponents()
        {
        }

        /// <inheritdoc />
        protected override void Dispose(bool disposing)
        {
            // The base class frees the registered parameters; the adapter frees its kept weight and its modules.
            base.Dispose(disposing);
            if (disposing)
                _lora.Dispose();
        }

        /// <summary>For example <c>LoraLinear(in_features=3, out_features=2, r=4, lora_alpha=8, bias=True, merged=False)</c>.</summary>
        public override string ToString() =>
            $"LoraLinear(in_features={in_features}, out_features={out_features}, r={r}, lora_alpha={lora_alpha}, " +
            $"bias={(_bias is null ? "False" : "True")}{(use_rslora ? ", use_rslora=True" : "")}, merged={(merged ? "True" : "False")})";

        /// <summary>
        /// Freezes every parameter whose name lacks <c>lora_</c>, as loralib's <c>mark_only_lora_as_trainable</c>.
        /// <paramref name="bias"/>: <c>"none"</c> keeps biases frozen; <c>"all"</c> trains every bias in the module;
        /// <c>"lora_only"</c> trains the biases of <see cref="LoraLinear"/> layers only.
        /// </summary>
        /// <exception cref="ArgumentException"><paramref name="bias"/> is not one of the three modes.</exception>
        public static void mark_only_lora_as_trainable(nn.Module module, string bias = "none")
        {
            ArgumentNullException.ThrowIfNull(module);
            CheckBiasMode(bias);
            foreach (var (name, parameter) in module.named_parameters())
                parameter.requires_grad_(name.Contains("lora_") || (bias == "all" && name.Contains("bias")));
            if (bias == "lora_only")
            {
                foreach (var layer in module.modules().Prepend(module).OfType<LoraLinear>())
                    layer._bias?.requires_grad_(true);
            }
        }

        /// <summary>
        /// The entries worth saving after LoRA fine-tuning, as loralib's <c>lora_state_dict</c>: every <c>lora_</c>
        /// entry, plus with <c>"all"</c> every bias, or with <c>"lora_only"</c> the biases of layers that have an adapter.
        /// </summary>
        /// <exception cref="ArgumentException"><paramref name="bias"/> is not one of the three modes.</exception>
        public static Dictionary<string, Tensor> lora_state_dict(nn.Module module, string bias = "none")
        {
            ArgumentNullException.ThrowIfNull(module);
            CheckBiasMode(bias);
            var all = module.state_dict();
            var result = new Dictionary<string, Tensor>();
            foreach (var (key, value) in all)
            {
                if (key.Contains("lora_"))
                {
                    result[key] = value;
                    string biasKey = key[..key.IndexOf("lora_", StringComparison.Ordinal)] + "bias";
                    if (bias == "lora_only" && all.TryGetValue(biasKey, out var b))
                        result[biasKey] = b;
                }
                else if (bias == "all" && key.Contains("bias"))
                {
                    result[key] = value;
                }
            }
            return result;
        }

        private Parameter Register(string name, Parameter value, Parameter? old = null)
        {
            if (old is not null && old.Handle == value.Handle)
                return old;
            old?.Dispose();
            var detached = (Parameter)value.DetachFromDisposeScope();
            ConditionallyRegisterParameter(name, detached);
            return detached;
        }

        private static void CheckBiasMode(string bias)
        {
            if (bias is not ("none" or "all" or "lora_only"))
                throw new ArgumentException($"bias must be \"none\", \"all\" or \"lora_only\", but was \"{bias}\".", nameof(bias));
        }

        /// <summary>The base layer, made after the adapter's arguments are checked: a refused call draws no random numbers.</summary>
        private static CustomLinear BaseLayer(long in_features, long out_features, bool bias, Device? device, ScalarType? dtype, int r, double lora_alpha, double lora_dropout)
        {
            CheckArguments(in_features, out_features, r, lora_alpha, lora_dropout, dtype ?? get_default_dtype());
            return new CustomLinear(in_features, out_features, bias, device, dtype);
        }

        /// <summary>
        /// The adapter's argument rules (those <see cref="LoraLayer"/>'s constructor applies), checked before the base layer
        /// is made, so that a refused call draws no random numbers; the exception names the argument.
        /// </summary>
        private static void CheckArguments(long in_features, long out_features, int r, double lora_alpha, double lora_dropout, ScalarType dtype)
        {
            if (in_features < 1)
                throw new ArgumentOutOfRangeException(nameof(in_features), in_features, $"LoraLinear: in_features must be 1 or more, but is {in_features}.");
            if (out_features < 1)
                throw new ArgumentOutOfRangeException(nameof(out_features), out_features, $"LoraLinear: out_features must be 1 or more, but is {out_features}.");
            if (r < 1)
                throw new ArgumentOutOfRangeException(nameof(r), r, $"LoraLinear: the rank r must be 1 or more, but is {r}.");
            if (!double.IsFinite(lora_alpha))
                throw new ArgumentOutOfRangeException(nameof(lora_alpha), lora_alpha, $"LoraLinear: lora_alpha must be a finite number, but is {lora_alpha.ToString(CultureInfo.InvariantCulture)}.");
            if (!(lora_dropout >= 0 && lora_dropout < 1))
                throw new ArgumentOutOfRangeException(nameof(lora_dropout), lora_dropout, $"LoraLinear: lora_dropout must be in [0, 1), but is {lora_dropout.ToString(CultureInfo.InvariantCulture)}.");
            if (dtype is not (ScalarType.Float32 or ScalarType.Float64 or ScalarType.Float16 or ScalarType.BFloat16))
                throw new ArgumentException($"LoraLinear: adapters are made for Float32, Float64, Float16 and BFloat16 layers, not {dtype}.", nameof(dtype));
        }
    }
}
