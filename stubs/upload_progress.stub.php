<?php

// Stubs for upload_progress

namespace UploadProgress {
    /**
     * A chunk or the whole file does not match its checksum.
     */
    class ChecksumMismatchException extends \UploadProgress\Exception {
        public function __construct() {}
    }

    /**
     * `UploadProgress\Exception`: the base of everything this extension throws.
     */
    class Exception extends \RuntimeException {
        public function __construct() {}
    }

    class Hub {
        public function __construct() {}

        /**
         * Runs the hub until SIGTERM/SIGINT (or until the watched FPM master exits).
         *
         * @return void
         */
        public static function run(): void {}
    }

    /**
     * Chunk index out of range, wrong length, or missing chunks at completion.
     */
    class InvalidChunkException extends \UploadProgress\Exception {
        public function __construct() {}
    }

    /**
     * Unknown or expired upload id.
     */
    class NotFoundException extends \UploadProgress\Exception {
        public function __construct() {}
    }

    /**
     * Disk full or another I/O failure of the storage.
     */
    class StorageException extends \UploadProgress\Exception {
        public function __construct() {}
    }

    /**
     * A chunked, resumable upload stored by the extension.
     */
    class Upload {
        public readonly int $chunkCount;

        public readonly int $chunkSize;

        public readonly string $id;

        public readonly int $totalBytes;

        public function __construct() {}

        /**
         * Removes the upload and tells its subscribers.
         *
         * @return void
         */
        public function abort(): void {}

        /**
         * Checks every chunk (and the optional sha256) and returns the absolute
         * path of the finished file; a second call returns the same path.
         *
         * @return string
         */
        public function complete(): string {}

        /**
         * Starts a new upload of `$totalBytes` bytes; the id is made here.
         *
         * @param int $totalBytes
         * @param array|null $options
         * @return \UploadProgress\Upload
         */
        public static function create(int $totalBytes, ?array $options = null): \UploadProgress\Upload {}

        /**
         * Opens an existing upload; NotFoundException when unknown or expired.
         *
         * @param string $id
         * @return \UploadProgress\Upload
         */
        public static function open(string $id): \UploadProgress\Upload {}

        /**
         * Everything known about the upload (see the contract for the keys).
         *
         * @return array
         */
        public function status(): array {}

        /**
         * Stores chunk `$index` from `$sourceFile`, or from the request body when
         * null. `$checksum` is `sha256:<hex>`. Returns status().
         *
         * @param int $index
         * @param string|null $sourceFile
         * @param string|null $checksum
         * @return array
         */
        public function writeChunk(int $index, ?string $sourceFile = null, ?string $checksum = null): array {}
    }

    /**
     * The body a Pusher auth endpoint returns for this socket and channel.
     *
     * @param string $socketId
     * @param string $channel
     * @param string|null $channelData
     * @return string
     */
    function auth(string $socketId, string $channel, ?string $channelData = null): string {}

    /**
     * State of this host's hub.
     *
     * @return array
     */
    function hub_status(): array {}

    /**
     * Latest event data of an upload as the hub knows it; null when unknown.
     *
     * @param string $uploadId
     * @return array|null
     */
    function progress(string $uploadId): ?array {}

    /**
     * Queues an event for every subscriber of `$channel`; false when dropped.
     * Never blocks. `$data` is a string (sent as is) or an array (sent as JSON).
     *
     * @param string $channel
     * @param string $event
     * @param mixed $data
     * @return bool
     */
    function publish(string $channel, string $event, mixed $data): bool {}

    /**
     * Semver of the extension.
     *
     * @return string
     */
    function version(): string {}
}
