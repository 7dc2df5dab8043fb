using System;

namespace TorchLinear
{
    /// <summary>
    /// Two tensors that should be close are not: thrown by <see cref="Equivalence.AssertClose"/> and by
    /// <c>ParityReport.AssertAllClose</c>. Its own type, so that it reads as a failed assertion under xunit, NUnit,
    /// MSTest or no framework at all; the message says where and by how much the tensors differ.
    /// </summary>
    public sealed class TensorMismatchException : Exception
    {
        /// <summary>Creates the exception with the comparison's report as its message.</summary>
        /// <param name="message">What differs, where, and by how much.</param>
        public TensorMismatchException(string message) : base(message)
        {
        }
    }
}
