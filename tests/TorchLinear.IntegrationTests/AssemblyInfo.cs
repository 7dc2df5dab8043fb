using Xunit;

// TorchSharp's global random generator (torch.manual_seed) is process-wide state that the seeded
// tests rely on, and the timing checks want the machine to themselves: test classes run one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
