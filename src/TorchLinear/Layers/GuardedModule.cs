using System;
using System.Collections.Generic;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// A module of one tensor in and one out that refuses every use after <c>Dispose</c> with an
    /// <see cref="ObjectDisposedException"/>, rather than answering with empty collections (which <c>Module.save</c> would
    /// write out as a valid, empty checkpoint) or with freed tensors. The one way to write a layer that guards its tensors:
    /// derive from it, call <see cref="ThrowIfDisposed"/> first in your own members, and it covers those of TorchSharp's
    /// <c>Module</c> (<c>state_dict</c>, <c>load_state_dict</c>, <c>named_parameters</c>, <c>parameters</c>,
    /// <c>named_buffers</c>, <c>.to(...)</c>, <c>save</c>). <see cref="CustomLinear"/> and the LoRA sample's
    /// <c>LoraLinear</c> derive from it.
    /// </summary>
    public abstract class GuardedModule : nn.Module<Tensor, Tensor>
    {
        /// <summary>Creates the module; <paramref name="name"/> is TorchSharp's module name.</summary>
        protected GuardedModule(string name) : base(name)
        {
        }

        /// <summary>True once <c>Dispose</c> has run: the module's tensors are freed.</summary>
        protected bool IsDisposed { get; private set; }

        /// <summary>Throws <see cref="ObjectDisposedException"/> if the module has been disposed.</summary>
        protected void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(IsDisposed, this);

        /// <inheritdoc />
        /// <exception cref="ObjectDisposedException">The module has been disposed.</exception>
        public override Dictionary<string, Tensor> state_dict(Dictionary<string, Tensor>? destination = null, string? prefix = null)
        {
            ThrowIfDisposed();
            return base.state_dict(destination, prefix);
        }

        /// <inheritdoc />
        /// <exception cref="ObjectDisposedException">The module has been disposed.</exception>
        public override (IList<string> missing_keys, IList<string> unexpected_keyes) load_state_dict(
            Dictionary<string, Tensor> source, bool strict = true, IList<string>? skip = null)
        {
            ThrowIfDisposed();
            return base.load_state_dict(source, strict, skip);
        }

        /// <inheritdoc />
        /// <exception cref="ObjectDisposedException">The module has been disposed.</exception>
        public override IEnumerable<(string name, Parameter parameter)> named_parameters(bool recurse = true)
        {
            // Checked when called, not when enumerated: the base method is an iterator.
            ThrowIfDisposed();
            return base.named_parameters(recurse);
        }

        /// <inheritdoc />
        /// <exception cref="ObjectDisposedException">The module has been disposed.</exception>
        public override IEnumerable<Parameter> parameters(bool recurse = true)
        {
            ThrowIfDisposed();
            return base.parameters(recurse);
        }

        /// <inheritdoc />
        /// <exception cref="ObjectDisposedException">The module has been disposed.</exception>
        public override IEnumerable<(string name, Tensor buffer)> named_buffers(bool recurse = true, bool include_nonpersistent = true)
        {
            ThrowIfDisposed();
            return base.named_buffers(recurse, include_nonpersistent);
        }

        /// <summary>
        /// Saves the parameters in TorchSharp's format, as <c>Module.save</c> does, but checks first that the module is not
        /// disposed, so that no empty file is created. (Called through a <c>Module</c> reference, TorchSharp's own
        /// <c>save</c> runs: it creates the file before it asks for the state_dict, and so leaves an empty file behind when
        /// the <see cref="ObjectDisposedException"/> comes.)
        /// </summary>
        /// <exception cref="ObjectDisposedException">The module has been disposed.</exception>
        public new nn.Module save(string location, IList<string>? skip = null)
        {
            ThrowIfDisposed();
            return base.save(location, skip);
        }

        // Module.to(...) enters through one of these; the check comes before TorchSharp touches the native module.

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
        protected override void Dispose(bool disposing)
        {
            // The base class frees the registered parameters, which it finds through named_parameters: the module counts
            // as disposed only once that is done.
            base.Dispose(disposing);
            IsDisposed = true;
        }
    }
}
