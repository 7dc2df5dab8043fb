using Xunit;

// TorchSharp's global random generator (torch.manual_seed) is process-wide state that the seeded
// tests rely on, so test classes must not run concurrently.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
