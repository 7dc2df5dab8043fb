// LoraLinear: a LoRA adapter around a frozen linear layer, built from Parameters.
// One self-contained file: copy it into a project that references TorchLinear (for LinearFunctional).
//
// Semantics follow microsoft/LoRA's loralib.Linear and Hugging Face PEFT's lora.Linear for one adapter:
//   y = x Wᵀ + b + (dropout(x) Aᵀ Bᵀ) · scaling,   scaling = lora_alpha / r   (or lora_alpha / √r with rsLoRA)
// with W (out, in) and b frozen, A (r, in) and B (out, r) trainable, A ~ kaiming_uniform(a = √5), B = 0.
using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace TorchLinear.Samples
{
    /// <summary>
    /// A linear layer with a low-rank adapter: <c>y = x Wᵀ + b + (dropout(x) Aᵀ Bᵀ) · scaling</c>.
    /// <c>weight</c> and <c>bias</c> are frozen; only <c>lora_A</c> and <c>lora_B</c> train.
    /// state_dict keys are loralib's: <c>weight</c>, <c>bias</c>, <c>lora_A</c>, <c>lora_B</c>.
    /// </summary>
    /// <remarks>
    /// A fresh adapter (B = 0) computes exactly what the wrapped layer computes. <see cref="merge"/> folds
    /// <c>B A · scaling</c> into the weight for inference; <see cref="unmerge"/> takes it out again.
    /// <code>
    /// using var lora = LoraLinear.FromLinear(pretrained, r: 8, lora_alpha: 16);
    /// var optimizer = torch.optim.Adam(lora.parameters().Where(p => p.requires_grad));
    /// </code>
    /// </remarks>
    public sealed class LoraLinear : nn.Module<Tensor, Tensor>
    {
        [ComponentName(Name = "weight")]
        private Parameter _weight;

        [ComponentName(Name = "bias")]
        private Parameter? _bias;

        [ComponentName(Name = "lora_A")]
        private Parameter _loraA;

        [ComponentName(Name = "lora_B")]
        private Parameter _loraB;

        // While merged, the weight before merging, kept so that unmerge() restores it exactly and state_dict() never
        // holds W + Δ (which a fresh layer would add Δ to a second time).
        private Tensor? _unmergedWeight;

        private bool _disposed;

        /// <summary>Creates a freshly initialised layer (as <c>nn.Linear</c>) with a fresh adapter.</summary>
        /// <param name="in_features">Size of each input sample.</param>
        /// <param name="out_features">Size of each output sample.</param>
        /// <param name="r">Rank of the adapter, 1 or more.</param>
        /// <param name="lora_alpha">Scale numerator, 0 or more: scaling = lora_alpha / r (or / √r with rsLoRA).</param>
        /// <param name="lora_dropout">Dropout probability on the adapter's input, in [0, 1); applied in training mode only.</param>
        /// <param name="bias">Whether the layer has a (frozen) bias.</param>
        /// <param name="use_rslora">Rank-stabilised LoRA: scaling = lora_alpha / √r.</param>
        /// <param name="device">Device of the parameters.</param>
        /// <param name="dtype">Floating-point dtype of the parameters.</param>
        public LoraLinear(long in_features, long out_features, int r, double lora_alpha = 1.0, double lora_dropout = 0.0,
                          bool bias = true, bool use_rslora = false, Device? device = null, ScalarType? dtype = null)
            : this(CheckedLinear(in_features, out_features, bias, device, dtype, r, lora_alpha, lora_dropout), r, lora_alpha, lora_dropout, use_rslora, ownsSource: true)
        {
        }

        private LoraLinear(CustomLinear source, int r, double lora_alpha, double lora_dropout, bool use_rslora, bool ownsSource)
            : base(nameof(LoraLinear))
        {
            CheckAdapterArguments(r, lora_alpha, lora_dropout);
            this.r = r;
            this.lora_alpha = lora_alpha;
            this.lora_dropout = lora_dropout;
            this.use_rslora = use_rslora;
            scaling = use_rslora ? lora_alpha / Math.Sqrt(r) : lora_alpha / r;
            in_features = source.in_features;
            out_features = source.out_features;

            using (no_grad())
            {
                // Copies, never aliases: training the adapter must not touch the layer it came from.
                // Registered in loralib's order, so state_dict() lists weight, bias, lora_A, lora_B.
                var (dtype, device) = (source.weight.dtype, source.weight.device);
                _weight = Replace(null, new Parameter(source.weight.detach().clone(), requires_grad: false), "weight");
                if (source.bias is not null)
                    _bias = Replace(null, new Parameter(source.bias.detach().clone(), requires_grad: false), "bias");
                _loraA = Replace(null, new Parameter(empty(r, in_features, dtype: dtype, device: device)), "lora_A");
                _loraB = Replace(null, new Parameter(zeros(out_features, r, dtype: dtype, device: device)), "lora_B");
            }
            if (ownsSource)
                source.Dispose();
            reset_lora_parameters();
        }

        /// <summary>Wraps a copy of a pretrained <see cref="CustomLinear"/>; the source is left untouched.</summary>
        public static LoraLinear FromLinear(CustomLinear pretrained, int r, double lora_alpha = 1.0, double lora_dropout = 0.0, bool use_rslora = false)
        {
            ArgumentNullException.ThrowIfNull(pretrained);
            return new LoraLinear(pretrained, r, lora_alpha, lora_dropout, use_rslora, ownsSource: false);
        }

        /// <summary>Wraps a copy of a pretrained TorchSharp <c>nn.Linear</c>; the source is left untouched.</summary>
        /// <exception cref="ArgumentException">The pretrained weight is not 2-D.</exception>
        public static LoraLinear FromLinear(Linear pretrained, int r, double lora_alpha = 1.0, double lora_dropout = 0.0, bool use_rslora = false)
        {
            ArgumentNullException.ThrowIfNull(pretrained);
            CheckAdapterArguments(r, lora_alpha, lora_dropout);
            if (pretrained.weight.dim() != 2)
                throw new ArgumentException($"LoraLinear.FromLinear: the pretrained weight must be 2-D (out_features, in_features), but has shape [{string.Join(", ", pretrained.weight.shape)}].", nameof(pretrained));
            // A temporary CustomLinear over copies of nn.Linear's tensors; the constructor copies again and disposes it.
            var copy = new CustomLinear(
                new Parameter(pretrained.weight.detach().clone()),
                pretrained.bias is null ? null : new Parameter(pretrained.bias.detach().clone()));
            return new LoraLinear(copy, r, lora_alpha, lora_dropout, use_rslora, ownsSource: true);
        }

        /// <summary>Size of each input sample.</summary>
        public long in_features { get; }

        /// <summary>Size of each output sample.</summary>
        public long out_features { get; }

        /// <summary>Rank of the adapter.</summary>
        public int r { get; }

        /// <summary>The scale numerator.</summary>
        public double lora_alpha { get; }

        /// <summary>Dropout probability on the adapter's input (training mode only).</summary>
        public double lora_dropout { get; }

        /// <summary>Whether scaling is lora_alpha / √r (rank-stabilised LoRA) rather than lora_alpha / r.</summary>
        public bool use_rslora { get; }

        /// <summary>The factor applied to the adapter's output.</summary>
        public double scaling { get; }

        /// <summary>True while <c>B A · scaling</c> is folded into <see cref="weight"/>.</summary>
        public bool merged { get; private set; }

        // The private setters are for Module.to(dtype/device), which replaces each parameter through the
        // property of the same name: the old tensor is freed and the new one registered under the same key.

        /// <summary>The frozen weight, (out_features, in_features); while merged, <c>W + Δ</c>.</summary>
        public Parameter weight { get { ThrowIfDisposed(); return _weight; } private set => _weight = Replace(_weight, value, "weight"); }

        /// <summary>The frozen bias, (out_features), or null.</summary>
        public Parameter? bias { get { ThrowIfDisposed(); return _bias; } private set => _bias = Replace(_bias, value!, "bias"); }

        /// <summary>The adapter's down-projection, (r, in_features).</summary>
        public Parameter lora_A { get { ThrowIfDisposed(); return _loraA; } private set => _loraA = Replace(_loraA, value, "lora_A"); }

        /// <summary>The adapter's up-projection, (out_features, r).</summary>
        public Parameter lora_B { get { ThrowIfDisposed(); return _loraB; } private set => _loraB = Replace(_loraB, value, "lora_B"); }

        /// <summary>Re-initialises the adapter as loralib does: A ~ kaiming_uniform(a = √5), B = 0.</summary>
        public void reset_lora_parameters()
        {
            ThrowIfDisposed();
            nn.init.kaiming_uniform_(_loraA, a: Math.Sqrt(5));
            nn.init.zeros_(_loraB);
        }

        /// <summary>The weight update the adapter stands for: <c>(B A) · scaling</c>, shape (out_features, in_features).</summary>
        public Tensor delta_weight()
        {
            ThrowIfDisposed();
            using var product = _loraB.matmul(_loraA);
            return product * scaling;
        }

        /// <summary>
        /// Folds the adapter into the weight (<c>W += B A · scaling</c>), so that forward is a single linear.
        /// A second call does nothing. While merged, the adapter gets no gradients: merge for inference.
        /// </summary>
        /// <remarks>
        /// The weight before merging is kept (one extra copy of W while merged): <see cref="unmerge"/> restores it bit for
        /// bit, and <see cref="state_dict"/> saves it, so that a state_dict always describes an unmerged layer and loading
        /// it anywhere can never apply the update twice.
        /// </remarks>
        public void merge()
        {
            ThrowIfDisposed();
            if (merged)
                return;
            using (no_grad())
            using (NewDisposeScope())
            {
                // In a dispose scope, so that detach()'s wrapper and the update are freed on the way out.
                _unmergedWeight = _weight.detach().clone().DetachFromDisposeScope();
                _weight.add_(delta_weight());
            }
            merged = true;
        }

        /// <summary>
        /// Takes the adapter out of the weight again, restoring the weight kept by <see cref="merge"/> bit for bit.
        /// (loralib and PEFT subtract <c>B A · scaling</c> instead, which can leave each element one rounding step off.)
        /// Does nothing when not merged.
        /// </summary>
        public void unmerge()
        {
            ThrowIfDisposed();
            if (!merged)
                return;
            using (no_grad())
                _weight.copy_(_unmergedWeight!);
            _unmergedWeight!.Dispose();
            _unmergedWeight = null;
            merged = false;
        }

        /// <summary>
        /// loralib's keys (<c>weight</c>, <c>bias</c>, <c>lora_A</c>, <c>lora_B</c>). A merged layer saves its weight as it
        /// was before merging, W, not W + Δ: every state_dict describes an unmerged layer, so loading it into a fresh layer
        /// (or into a merged one, see <see cref="load_state_dict"/>) applies the update exactly once.
        /// </summary>
        /// <exception cref="ObjectDisposedException">The layer has been disposed.</exception>
        public override Dictionary<string, Tensor> state_dict(Dictionary<string, Tensor>? destination = null, string? prefix = null)
        {
            ThrowIfDisposed();
            var result = base.state_dict(destination, prefix);
            if (merged)
                result[string.IsNullOrEmpty(prefix) ? "weight" : $"{prefix}.weight"] = _unmergedWeight!;
            return result;
        }

        /// <summary>
        /// Copies the tensors of <paramref name="source"/> after checking every key, shape and dtype, as
        /// <see cref="CustomLinear.load_state_dict"/> does: TorchSharp's own <c>load_state_dict</c> would let
        /// <c>copy_</c> broadcast an r = 1 adapter into an r = 4 layer. A refusal names every problem and changes nothing.
        /// Into a merged layer, the state (an unmerged one, see <see cref="state_dict"/>) is loaded and then merged again.
        /// </summary>
        /// <exception cref="InvalidOperationException">A key is missing or unexpected (when strict), or a shape or dtype
        /// differs; the type TorchSharp throws for a missing or unexpected key.</exception>
        /// <exception cref="ObjectDisposedException">The layer has been disposed.</exception>
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
        /// <exception cref="ObjectDisposedException">The layer has been disposed.</exception>
        public override IEnumerable<(string name, Parameter parameter)> named_parameters(bool recurse = true)
        {
            ThrowIfDisposed();
            return base.named_parameters(recurse);
        }

        /// <inheritdoc />
        /// <exception cref="ObjectDisposedException">The layer has been disposed.</exception>
        public override IEnumerable<Parameter> parameters(bool recurse = true)
        {
            ThrowIfDisposed();
            return base.parameters(recurse);
        }

        /// <inheritdoc />
        protected override nn.Module _to(Device device, ScalarType dtype, bool non_blocking)
        {
            ThrowIfDisposed();
            return base._to(device, dtype, non_blocking);
        }

        /// <inheritdoc />
        protected override nn.Module _to(DeviceType deviceType, int deviceIndex, bool non_blocking)
        {
            ThrowIfDisposed();
            return base._to(deviceType, deviceIndex, non_blocking);
        }

        /// <inheritdoc />
        protected override nn.Module _to(ScalarType dtype, bool non_blocking)
        {
            ThrowIfDisposed();
            return base._to(dtype, non_blocking);
        }

        /// <inheritdoc />
        protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
        {
            // The kept weight is not a parameter, so Module.to would not convert it: convert unmerged, merge again.
            bool wasMerged = merged;
            unmerge();
            base._toEpilog(dtype, device, non_blocking);
            if (wasMerged)
                merge();
        }

        /// <inheritdoc />
        protected override void Dispose(bool disposing)
        {
            if (disposing)
            {
                _unmergedWeight?.Dispose();
                _unmergedWeight = null;
            }
            // The base class frees the parameters it finds through named_parameters: disposed only after it.
            base.Dispose(disposing);
            _disposed = true;
        }

        private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

        /// <summary>
        /// Unmerged: <c>linear(x, W, b) + (dropout(x) Aᵀ Bᵀ) · scaling</c>; merged: <c>linear(x, W + Δ, b)</c>.
        /// </summary>
        /// <exception cref="ArgumentException">The input does not fit the layer; the message says how.</exception>
        public override Tensor forward(Tensor input)
        {
            ThrowIfDisposed();
            Tensor result;
            try
            {
                // LinearFunctional.linear checks the input before any matmul runs (TorchSharp's matmul aborts
                // the process on bad input), so the adapter's matmuls below always get a valid x.
                result = LinearFunctional.linear(input, _weight, _bias);
            }
            catch (ArgumentException error)
            {
                throw new ArgumentException($"{this}: {error.Message}", error);
            }
            if (merged)
                return result;

            try
            {
                // Every temporary of the adapter path is freed here; result was made outside this scope.
                using var scope = NewDisposeScope();
                Tensor x = training && lora_dropout > 0 ? nn.functional.dropout(input, lora_dropout, training: true) : input;
                // (x Aᵀ Bᵀ) · scaling, scaled in place: the same bits as loralib's expression, one full-size tensor fewer.
                Tensor update = x.matmul(_loraA.t()).matmul(_loraB.t()).mul_(scaling);
                result.add_(update);
                return result;
            }
            catch
            {
                result.Dispose();
                throw;
            }
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
                parameter.requires_grad_(name.Contains("lora_"));
            if (bias == "all")
            {
                foreach (var (name, parameter) in module.named_parameters())
                {
                    if (name.Contains("bias"))
                        parameter.requires_grad_(true);
                }
            }
            else if (bias == "lora_only")
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
                    if (bias == "lora_only")
                    {
                        string biasKey = key[..key.IndexOf("lora_", StringComparison.Ordinal)] + "bias";
                        if (all.TryGetValue(biasKey, out var b))
                            result[biasKey] = b;
                    }
                }
                else if (bias == "all" && key.Contains("bias"))
                {
                    result[key] = value;
                }
            }
            return result;
        }

        private Parameter Replace(Parameter? old, Parameter value, string name)
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

        private static void CheckAdapterArguments(int r, double lora_alpha, double lora_dropout)
        {
            if (r <= 0)
                throw new ArgumentOutOfRangeException(nameof(r), r, $"LoraLinear: the rank r must be 1 or more, but was {r}.");
            if (!(lora_alpha >= 0))
                throw new ArgumentOutOfRangeException(nameof(lora_alpha), lora_alpha, $"LoraLinear: lora_alpha must be 0 or more, but was {lora_alpha}.");
            if (!(lora_dropout >= 0 && lora_dropout < 1))
                throw new ArgumentOutOfRangeException(nameof(lora_dropout), lora_dropout, $"LoraLinear: lora_dropout must be in [0, 1), but was {lora_dropout}.");
        }

        private static CustomLinear CheckedLinear(long in_features, long out_features, bool bias, Device? device, ScalarType? dtype, int r, double lora_alpha, double lora_dropout)
        {
            // Checked before the base layer draws its initial values, so a refused call consumes no random numbers.
            CheckAdapterArguments(r, lora_alpha, lora_dropout);
            return new CustomLinear(in_features, out_features, bias, device, dtype);
        }
    }
}
