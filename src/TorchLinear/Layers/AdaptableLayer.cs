using System;
using System.Collections.Generic;
using System.Diagnostics.CodeAnalysis;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// What TorchLinear's weight layers (<see cref="CustomLinear"/>, <see cref="Conv1D"/>) share: an <see cref="Adapter"/>
    /// slot their forward runs, a <c>load_state_dict</c> that checks every key, shape and dtype before it copies anything,
    /// and the check their <c>weight</c> and <c>bias</c> setters make that a new tensor has its partner's dtype and device
    /// (except while <c>Module.to(...)</c> converts the layer). Only these two layers derive from it: TorchLinear.Lora
    /// knows them by their types.
    /// </summary>
    public abstract class AdaptableLayer : GuardedModule
    {
        /// <summary>Creates the layer; <paramref name="name"/> is TorchSharp's module name.</summary>
        private protected AdaptableLayer(string name) : base(name)
        {
        }

        /// <summary>
        /// A term added to the layer's output by every <c>forward</c>, or null (the default): called as
        /// <c>Adapter(input, output)</c> once the layer's own result is computed, it returns the layer's result —
        /// <c>output</c> itself, updated in place, or a new tensor (the layer then disposes <c>output</c>).
        /// </summary>
        /// <remarks>
        /// This is how an adapter (for example TorchLinear.Lora's LoRA adapters) runs inside the layer, so that it runs
        /// whether the layer is invoked with <c>call(x)</c> or with <c>forward(x)</c> — TorchSharp runs forward hooks
        /// only through <c>call(x)</c> — and without changing the layer's type. <c>input</c> is the layer's input as
        /// given and <c>output</c> has the layer's output shape. The adapter is not a child of the layer and is not
        /// disposed with it; whoever sets it owns it. While TorchLinear.Lora's adapters are in it, the slot is the
        /// library's: code that nulls or replaces it makes every later LoRA operation on the model refuse, naming the
        /// layer, until the library's delegate is back or the model is unloaded. An empty slot costs one null check per
        /// call.
        /// </remarks>
        public Func<Tensor, Tensor, Tensor>? Adapter { get; set; }

        /// <summary>True while <c>Module.to(...)</c> replaces weight and bias one after the other: in between, they
        /// briefly differ in dtype or device, which the setters otherwise refuse.</summary>
        protected bool Converting { get; private set; }

        /// <summary>
        /// <paramref name="output"/> (the layer's own result for <paramref name="input"/>) after the <see cref="Adapter"/>,
        /// if one is set. If the adapter throws, or returns a new tensor, <paramref name="output"/> is disposed.
        /// </summary>
        protected Tensor WithAdapter(Tensor input, Tensor output)
        {
            Func<Tensor, Tensor, Tensor>? adapter = Adapter;
            if (adapter is null)
                return output;
            Tensor result;
            try
            {
                result = adapter(input, output);
            }
            catch
            {
                output.Dispose();
                throw;
            }
            if (!ReferenceEquals(result, output))
                output.Dispose();
            return result;
        }

        /// <summary>
        /// Makes <paramref name="value"/> the layer's parameter <paramref name="name"/> in place of <paramref name="old"/>,
        /// which is disposed: detached from any dispose scope (the layer owns its parameters; a caller's scope must not free
        /// them) and registered under that state_dict key, or unregistered for null. Returns the parameter to keep.
        /// </summary>
        [return: NotNullIfNotNull(nameof(value))]
        protected Parameter? Replace(Parameter? old, Parameter? value, string name)
        {
            old?.Dispose();
            var owned = (Parameter?)value?.DetachFromDisposeScope();
            ConditionallyRegisterParameter(name, owned);
            return owned;
        }

        /// <summary>
        /// Throws unless <paramref name="value"/> (the new <paramref name="name"/>) has <paramref name="other"/>'s dtype and
        /// device, so that a mismatch is refused when set rather than at the next forward; not while converting.
        /// </summary>
        /// <exception cref="ArgumentException">The dtype or the device differs.</exception>
        protected void ThrowIfUnlike(Tensor value, string name, Tensor? other, string otherName)
        {
            if (Converting || other is null)
                return;
            if (value.dtype != other.dtype)
                throw new ArgumentException($"{this}: a new {name} must have the {otherName}'s dtype {other.dtype}, but is {value.dtype}. Convert it first, or convert the whole layer with .to({value.dtype}).", nameof(value));
            if (!TensorFacts.SameDevice(value, other))
                throw new ArgumentException($"{this}: a new {name} must be on the {otherName}'s device {other.device}, but is on {value.device}. Move it first, or move the whole layer with .to(...).", nameof(value));
        }

        /// <summary>
        /// Copies the parameters from <paramref name="source"/>, after checking every key, shape and dtype. Unlike the base
        /// implementation, which lets <c>copy_</c> broadcast a <c>(1)</c> tensor into an <c>(out)</c> bias (or copy a
        /// square weight stored the other way round), a mismatch is refused before anything is copied, so a refused load
        /// changes nothing. Tensors of another dtype are refused, not converted.
        /// </summary>
        /// <remarks>
        /// Refusals are <see cref="InvalidOperationException"/>s, the type TorchSharp's own <c>load_state_dict</c>
        /// throws for a missing or unexpected key, so that code written against <c>nn.Linear</c> catches them; shape and
        /// dtype mismatches, which TorchSharp does not detect, use the same type.
        /// </remarks>
        /// <exception cref="InvalidOperationException">A key is missing or unexpected (when strict), or a shape or
        /// dtype differs. The message lists every problem.</exception>
        /// <exception cref="ObjectDisposedException">The layer has been disposed.</exception>
        public override (IList<string> missing_keys, IList<string> unexpected_keyes) load_state_dict(
            Dictionary<string, Tensor> source, bool strict = true, IList<string>? skip = null)
        {
            ThrowIfDisposed();
            ArgumentNullException.ThrowIfNull(source);
            StateDicts.ThrowIfProblems(this, source, strict, skip, from: null);
            return base.load_state_dict(source, strict, skip);
        }

        /// <inheritdoc />
        protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
        {
            Converting = true;
            try
            {
                base._toEpilog(dtype, device, non_blocking);
            }
            finally
            {
                Converting = false;
            }
        }
    }
}
