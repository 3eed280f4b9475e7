--TEST--
the exception hierarchy of the contract, constructible from PHP
--FILE--
<?php
use UploadProgress as U;
var_dump(is_subclass_of(U\Exception::class, RuntimeException::class));
foreach (['NotFoundException', 'InvalidChunkException', 'ChecksumMismatchException', 'StorageException'] as $c) {
    $e = new ("UploadProgress\\$c")("msg $c", 7);
    echo $c, ': ', $e instanceof U\Exception ? 'extends Exception' : 'WRONG', ', ', $e->getMessage(), ', ', $e->getCode(), "\n";
}
try { throw new U\NotFoundException('x'); } catch (RuntimeException $e) { echo "caught as RuntimeException\n"; }
?>
--EXPECT--
bool(true)
NotFoundException: extends Exception, msg NotFoundException, 7
InvalidChunkException: extends Exception, msg InvalidChunkException, 7
ChecksumMismatchException: extends Exception, msg ChecksumMismatchException, 7
StorageException: extends Exception, msg StorageException, 7
caught as RuntimeException
