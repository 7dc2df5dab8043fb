using System;
using System.IO;
using Snapshooter;
using Snapshooter.Xunit;

namespace TorchLinear.Tests
{
    /// <summary>
    /// The one place that talks to the snapshot library. Every snapshot test calls <see cref="Match"/>;
    /// moving from Snapshooter to Verify.Xunit (not restorable from this project's feed) means rewriting
    /// this file only.
    /// </summary>
    internal static class Snapshots
    {
        /// <summary>The repository's root: the folder above the test binaries that holds TorchLinear.sln.</summary>
        public static readonly string RepositoryRoot = FindRepositoryRoot();

        /// <summary>The repository's top-level snapshots folder; Snapshooter adds its own __snapshots__ below it.</summary>
        public static readonly string Folder = Path.Combine(RepositoryRoot, "snapshots");

        /// <summary>
        /// Compares <paramref name="value"/>, serialised as JSON, with the snapshot named after the calling test
        /// (<c>Class.Method</c>, plus <c>_extension</c> when given). Under <c>SNAPSHOOTER_STRICT_MODE=on</c> a
        /// missing snapshot fails; otherwise it is written for review.
        /// </summary>
        public static void Match(object value, string? extension = null)
        {
            string file = Snapshot.FullName().Filename;
            if (extension is not null)
                file = Path.GetFileNameWithoutExtension(file) + "_" + extension + FileNames.SnapshotFileExtension;
            Snapshot.Match(value, new SnapshotFullName(file, Folder));
        }

        private static string FindRepositoryRoot()
        {
            for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
            {
                if (File.Exists(Path.Combine(directory.FullName, "TorchLinear.sln")))
                    return directory.FullName;
            }
            throw new InvalidOperationException($"No TorchLinear.sln above {AppContext.BaseDirectory}: the snapshot folder cannot be found.");
        }
    }
}
