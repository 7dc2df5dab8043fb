namespace TorchLinear.Lora
{
    /// <summary>
    /// The values of <see cref="LoraConfig.bias"/>, spelled as PEFT spells them in <c>adapter_config.json</c>: which biases
    /// train with the adapter.
    /// </summary>
    public static class LoraBias
    {
        /// <summary><c>"none"</c>: no bias trains (PEFT's default).</summary>
        public const string None = "none";

        /// <summary><c>"all"</c>: every bias of the model trains and is saved with the adapter.</summary>
        public const string All = "all";

        /// <summary><c>"lora_only"</c>: the biases of the adapted layers train and are saved with the adapter.</summary>
        public const string LoraOnly = "lora_only";
    }

    /// <summary>The values of <see cref="LoraConfig.init_lora_weights"/> this library implements, as PEFT spells them (its JSON <c>true</c>/<c>false</c> read as these strings).</summary>
    public static class LoraInit
    {
        /// <summary><c>"true"</c>: A kaiming-uniform, B zero, so a fresh adapter changes nothing (PEFT's default).</summary>
        public const string True = "true";

        /// <summary><c>"gaussian"</c>: A normal with standard deviation 1/r, B zero.</summary>
        public const string Gaussian = "gaussian";

        /// <summary><c>"false"</c>: A and B as <c>nn.Linear</c> initialises its weight (a fresh adapter changes the output).</summary>
        public const string False = "false";
    }

    /// <summary>The values of <c>add_weighted_adapter</c>'s <c>combination_type</c> this library implements, as PEFT spells them.</summary>
    public static class CombinationType
    {
        /// <summary><c>"svd"</c>: the best rank-<c>svd_rank</c> factors of the weighted sum of the updates (PEFT's default).</summary>
        public const string Svd = "svd";

        /// <summary><c>"linear"</c>: a weighted combination of the factors (equal ranks).</summary>
        public const string Linear = "linear";

        /// <summary><c>"cat"</c>: the factors concatenated, exactly the weighted sum of the updates.</summary>
        public const string Cat = "cat";
    }
}
